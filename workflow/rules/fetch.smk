# Fetch in two steps: metadata first (validation needs nothing else), weights after.


rule fetch_metadata:
    input:
        local_model_input,
    output:
        directory("resources/models/{slug}/meta"),
    log:
        "logs/fetch_metadata/{slug}.log",
    localrule: True
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        ref=lambda wc: REFS[wc.slug],
    script:
        "../scripts/fetch_metadata.py"


rule fetch_weights:
    input:
        meta="resources/models/{slug}/meta",
        # Weights are downloaded only once every merge of this run that uses the model has validated. A
        # change of that set of merges alone reruns nothing (the profiles' rerun-triggers leave out
        # "input"); a new merge's plan reruns it, but its record comes out the same, so the merges
        # already built from the model stay finished.
        plans=plans_using,
    output:
        "resources/models/{slug}/weights.json",
    log:
        "logs/fetch_weights/{slug}.log",
    benchmark:
        "resources/models/{slug}/benchmarks/fetch_weights.tsv"
    # The gates and every shard wait for every fetch; one model's hash job (needed only by assembly)
    # does not run before another model's fetch. The base first: the gates need only its weights.
    priority: fetch_weights_priority
    localrule: True
    resources:
        mem_mb=1000,
        runtime=600,
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
    # After the shard jobs (priority 1), which write the output, on most disks the slowest part of a
    # build: the writes start at once, and the hashes then read the weights the shards left in the
    # page cache.
    priority: 0
    resources:
        mem_mb=500,
        runtime=120,
    script:
        "../scripts/hash_weights.py"
