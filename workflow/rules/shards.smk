# The merge shards (plan.json names them). The globals and runs of consecutive decoder layers read the
# source models and are keyed by what they hold (plan.json's shard_keys): merges that need the same shard
# share one job and one file, linked into each model. The routers shard reads the merge's gates.


rule shard:
    input:
        # Where its sources' weights are; its plan rows are a parameter (shard_rows).
        weights=shard_weight_records,
    output:
        # Removed once every merge that links it is assembled.
        shard=temp("results/shards/{key}.safetensors"),
        digest=temp("results/shards/{key}.sha256"),
    log:
        "logs/shards/{key}.log",
    benchmark:
        "results/shards/benchmarks/{key}.tsv"
    resources:
        mem_mb=shard_mem_mb,
        runtime=60,
    params:
        rows=shard_rows,
    script:
        "../scripts/shard.py"


rule routers_shard:
    input:
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
        # The trained routers when the recipe trains them, else the gates.
        gates=lambda wc: routers_source(wc.merge),
    output:
        shard=temp(f"results/{{merge}}/shards/{ROUTERS_SHARD}.safetensors"),
        digest=temp(f"results/{{merge}}/shards/{ROUTERS_SHARD}.sha256"),
    log:
        f"logs/{{merge}}/shards/{ROUTERS_SHARD}.log",
    benchmark:
        f"results/{{merge}}/benchmarks/shard-{ROUTERS_SHARD}.tsv"
    resources:
        mem_mb=routers_mem_mb,
        runtime=60,
    script:
        "../scripts/routers_shard.py"
