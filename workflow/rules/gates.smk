# Router matrices, one [experts, hidden] per layer, computed from the base model, after the plan is checked
# against the installed transformers class (the one job that imports transformers' models before assembly).
# The shard rule writes the routers shard from them.


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
    log:
        "logs/{merge}/gates.log",
    # Wall time and peak memory of every job: what a cluster profile should ask for.
    benchmark:
        "results/{merge}/benchmarks/gates.tsv"
    # On the longest chain before assembly (translate_config, gates, routers shard): before the other shards.
    priority: 1
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
