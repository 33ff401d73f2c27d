# Router matrices, one [experts, hidden] per layer, computed from the base model. Named by what they are
# computed from (moeforge.gates.key): merges and search candidates that differ only in keys the gates do not
# read (experts_per_token, router training, the output config's translation) share one job and one file.
# Router training starts from them; the routers shard reads them (or the trained routers).


rule gates:
    input:
        # The base model's weights, as the first merge that computes these gates fetched them.
        base_weights=gates_base_weights,
    output:
        tensors="results/gates/{gates_key}.safetensors",
        stats="results/gates/{gates_key}.json",
    log:
        "logs/gates/{gates_key}.log",
    # Wall time and peak memory of every job: what a cluster profile should ask for.
    benchmark:
        "results/gates/benchmarks/{gates_key}.tsv"
    # On the longest chain before assembly (gates, router training, routers shard): before the other shards.
    priority: 1
    # The one compute-bound job: forward passes of the base model, one layer at a time. Several threads
    # only when the forward pass is heavy (many prompts, a large base); else one, beside the shard jobs.
    # The settings' count, not Snakemake's allotment: a rerun on other --cores sums in the same order.
    threads: lambda wc: gates_job_settings(wc)["threads"]
    resources:
        mem_mb=gates_mem_mb,
        runtime=120,
        # A GPU only when the recipe asks for gate_device: cuda (SLURM maps this to --gpus).
        gpu=lambda wc: int(gates_job_settings(wc)["recipe"]["gate_device"] == "cuda"),
    params:
        settings=gates_job_settings,
    script:
        "../scripts/gates.py"
