# The merge shards that read the source models: the globals and runs of consecutive decoder layers
# (plan.json names them). They run while the gates are computed; the gates job writes the routers shard.


rule shard:
    input:
        # plan.json sizes the job's memory request (shard_mem_mb).
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
        weights=weight_records,
    output:
        shard=temp("results/{merge}/shards/{shard}.safetensors"),
        digest=temp("results/{merge}/shards/{shard}.sha256"),
    log:
        "logs/{merge}/shards/{shard}.log",
    benchmark:
        "results/{merge}/benchmarks/shard-{shard}.tsv"
    # After the fetches and the gates.
    priority: 1
    resources:
        mem_mb=shard_mem_mb,
        runtime=60,
    script:
        "../scripts/shard.py"
