# The Hub-ready staging model: shards linked in place, index, config, tokenizer, card, lock. The smoke test
# checks it there; publish (publish.smk) then puts it at results/{merge}/model.


rule assemble:
    input:
        plan="results/{merge}/plan.json",
        shards=all_shards,
        digests=all_shard_digests,
        config="results/{merge}/config/config.json",
        translation="results/{merge}/config/translation.json",
        base_meta=lambda wc: f"resources/models/{base_slug(wc)}/meta",
        hashes=weight_hashes,
        # The training texts' sha256, for the lock (router_training only).
        training=router_training_report,
        # No model directory unless the plan passed the check against the transformers class, under this
        # config.json (assembly compares them).
        checked=class_check_of,
    output:
        # The lock file marks a complete model directory: assemble builds the directory under a
        # temporary name and renames it into place whole, lock included (no .snakemake_timestamp
        # inside a Hub-ready directory).
        lock="results/{merge}/staging/model/moeforge.lock.json",
    log:
        "logs/{merge}/assemble.log",
    # Wall time and peak memory of every job: what a cluster profile should ask for.
    benchmark:
        "results/{merge}/benchmarks/assemble.tsv"
    resources:
        mem_mb=1000,
        runtime=60,
    script:
        "../scripts/assemble.py"
