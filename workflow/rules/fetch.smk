# Fetch in steps: a local model's content first, then metadata (validation needs nothing else), where the
# weights are (no download), and each merge's weights once that merge has validated.


rule hash_source:
    input:
        demo_model_dir,
    output:
        # Rewritten at parse time when a file's bytes change (see the refresh in common.smk).
        "resources/models/{slug}/content.json",
    log:
        "logs/hash_source/{slug}.log",
    benchmark:
        "resources/models/{slug}/benchmarks/hash_source.tsv"
    resources:
        mem_mb=500,
        runtime=120,
    params:
        ref=lambda wc: REFS[wc.slug],
        cache=hash_cache,
    script:
        "../scripts/hash_source.py"


rule fetch_metadata:
    input:
        # A local model's content record: a changed file reruns what was built from the model.
        source_content,
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


rule locate_weights:
    input:
        meta="resources/models/{slug}/meta",
        content=source_content,
    output:
        "resources/models/{slug}/weights.json",
    log:
        "logs/locate_weights/{slug}.log",
    localrule: True
    resources:
        mem_mb=500,
        runtime=120,
    params:
        cache=hash_cache,
    script:
        "../scripts/locate_weights.py"


rule fetch_weights:
    input:
        # Only this merge's plan: its weights are downloaded once it has validated, whatever other merges
        # of the same models the run holds (those have their own jobs; none reruns this one).
        plan="results/{merge}/plan.json",
        weights="resources/models/{slug}/weights.json",
    output:
        "results/{merge}/weights/{slug}.json",
    log:
        "logs/fetch_weights/{merge}/{slug}.log",
    benchmark:
        "results/{merge}/benchmarks/fetch_weights-{slug}.tsv"
    # The gates and every shard wait for the merge's fetches. The base first: the gates need only its weights.
    priority: fetch_weights_priority
    localrule: True
    resources:
        mem_mb=1000,
        runtime=600,
    params:
        cache=hash_cache,
    script:
        "../scripts/fetch_weights.py"
