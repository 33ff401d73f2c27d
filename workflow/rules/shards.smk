# Per-layer merge shards (one job per decoder layer) and the globals shard.


rule layer_shard:
    input:
        # plan.json sizes the job's memory request (shard_mem_mb).
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
        checked="results/{merge}/class_check.json",
        weights=weight_records,
        gates="results/{merge}/gates.safetensors",
    output:
        shard=temp("results/{merge}/shards/layer-{layer}.safetensors"),
        digest=temp("results/{merge}/shards/layer-{layer}.sha256"),
    params:
        shard=lambda wc: f"layer-{wc.layer}",
    log:
        "logs/{merge}/shards/layer-{layer}.log",
    benchmark:
        "results/{merge}/benchmarks/layer-{layer}.tsv"
    resources:
        mem_mb=shard_mem_mb,
        runtime=60,
    script:
        "../scripts/shard.py"


rule globals_shard:
    input:
        # plan.json sizes the job's memory request (shard_mem_mb).
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
        checked="results/{merge}/class_check.json",
        weights=weight_records,
    output:
        shard=temp("results/{merge}/shards/globals.safetensors"),
        digest=temp("results/{merge}/shards/globals.sha256"),
    params:
        shard="globals",
    log:
        "logs/{merge}/shards/globals.log",
    benchmark:
        "results/{merge}/benchmarks/globals.tsv"
    resources:
        mem_mb=shard_mem_mb,
        runtime=60,
    script:
        "../scripts/shard.py"
