# The merge shards (plan.json names them): the globals and runs of consecutive decoder layers, which read
# the source models, and the routers, which read the gates file.


rule shard:
    input:
        # plan.json sizes the job's memory request (shard_mem_mb).
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
        weights=shard_weight_records,
        gates=shard_gates,
    output:
        shard=temp("results/{merge}/shards/{shard}.safetensors"),
        digest=temp("results/{merge}/shards/{shard}.sha256"),
    log:
        "logs/{merge}/shards/{shard}.log",
    benchmark:
        "results/{merge}/benchmarks/shard-{shard}.tsv"
    resources:
        mem_mb=shard_mem_mb,
        runtime=60,
    script:
        "../scripts/shard.py"
