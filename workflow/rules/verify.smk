# `snakemake verify`: recheck finished (or downloaded) model directories against their lock files
# and rerun the smoke test. A target rule without outputs, so it runs every time it is asked for.


rule verify:
    input:
        locks=lambda wc: [f"{path}/moeforge.lock.json" for path in VERIFY.values()],
    log:
        "logs/verify.log",
    localrule: True
    params:
        models=lambda wc: VERIFY,
        # The sources' stat caches: verify hashes the sources the locks name again, through them.
        sources="resources/models",
        device=lookup(dpath="smoke/device", within=config),
        max_new_tokens=lookup(dpath="smoke/max_new_tokens", within=config),
        dtype=lookup(dpath="smoke/dtype", within=config),
        memory_gb=lookup(dpath="smoke/memory_gb", within=config, default=None),
    script:
        "../scripts/verify.py"
