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
    resources:
        mem_mb=500,
        runtime=120,
    script:
        "../scripts/hash_weights.py"
