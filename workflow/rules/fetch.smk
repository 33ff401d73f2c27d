# Fetch in two steps: metadata first (validation needs nothing else), weights after.


rule fetch_metadata:
    input:
        local_model_input,
    output:
        directory("resources/models/{slug}/meta"),
    params:
        ref=lambda wc: REFS[wc.slug],
    log:
        "logs/fetch_metadata/{slug}.log",
    resources:
        mem_mb=1000,
        runtime=30,
    localrule: True
    script:
        "../scripts/fetch_metadata.py"


rule fetch_weights:
    input:
        meta="resources/models/{slug}/meta",
        # Weights are downloaded only once every merge that uses the model has validated.
        plans=plans_using,
    output:
        "resources/models/{slug}/weights.json",
    log:
        "logs/fetch_weights/{slug}.log",
    benchmark:
        "resources/models/{slug}/benchmarks/fetch_weights.tsv"
    # The gates and every shard wait for every fetch; one model's hash job (needed only by assembly)
    # does not run before another model's fetch.
    priority: 10
    resources:
        mem_mb=1000,
        runtime=600,
    localrule: True
    script:
        "../scripts/fetch_weights.py"


rule hash_weights:
    input:
        meta="resources/models/{slug}/meta",
        weights="resources/models/{slug}/weights.json",
    output:
        "resources/models/{slug}/weights.sha256.json",
    log:
        "logs/hash_weights/{slug}.log",
    benchmark:
        "resources/models/{slug}/benchmarks/hash_weights.tsv"
    # Before the shard jobs: reading whole files in order is the fastest way to get the weights off
    # the disk, and the shards then read them from the page cache (a 1B-class build, one cold run
    # each: 40 s with this order, 52 s with the hashes last).
    priority: 5
    resources:
        mem_mb=500,
        runtime=120,
    script:
        "../scripts/hash_weights.py"
