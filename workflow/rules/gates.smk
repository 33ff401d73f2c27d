# Router matrices, one [experts, hidden] per layer, computed from the base model, after the plan is checked
# against the installed transformers class (the one job that imports transformers' models before assembly);
# then the routers shard, written from them.


rule gates:
    input:
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
        # The config.json translate_config wrote: the one the output will carry.
        config="results/{merge}/config/config.json",
        # The base model's weights, fetched for this merge.
        base_weights=base_weight_record,
    output:
        tensors="results/{merge}/gates.safetensors",
        stats="results/{merge}/gates.json",
        checked="results/{merge}/class_check.json",
        # The routers shard, in the plan's names and dtype: written here, from the matrices in hand, so
        # assembly follows the gates directly (one job less on the critical path, one queue wait less on a cluster).
        routers=temp(f"results/{{merge}}/shards/{ROUTERS_SHARD}.safetensors"),
        routers_digest=temp(f"results/{{merge}}/shards/{ROUTERS_SHARD}.sha256"),
    log:
        "logs/{merge}/gates.log",
    # Wall time and peak memory of every job: what a cluster profile should ask for.
    benchmark:
        "results/{merge}/benchmarks/gates.tsv"
    # Usually the longest job before assembly: started first, it runs while the shard jobs are written.
    priority: 10
    # The one compute-bound job: forward passes of the base model, one layer at a time. Several threads
    # only when the forward pass is heavy (many prompts, a large base); else one, beside the shard jobs.
    threads: gates_threads
    resources:
        mem_mb=layer_mem_mb,
        runtime=120,
        # A GPU only when the recipe asks for gate_device: cuda (SLURM maps this to --gpus).
        gpu=lambda wc: int(RECIPES[wc.merge].gate_device == "cuda"),
    script:
        "../scripts/gates.py"
