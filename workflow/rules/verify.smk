# `snakemake verify`: recheck finished (or downloaded) model directories against their lock files and rerun
# the smoke test. A model is checked again when one of its files or its sources change (`--forcerun verify_model`
# to check anyway).


rule verify_model:
    input:
        # Every file the lock lists, once it is there: a changed file reruns the check.
        verify_inputs,
    output:
        json="results/verify/{name}/report.json",
        md="results/verify/{name}/report.md",
        lock_check="results/verify/{name}/lock_check.json",
    log:
        "logs/verify/{name}.log",
    wildcard_constraints:
        name=one_of(VERIFY),
    localrule: True
    params:
        model=lambda wc: VERIFY[wc.name],
        # The sources' stat caches: verify hashes the sources the lock names again, through them.
        sources="resources/models",
        # A source replaced or edited since the last check (by stat tuple) makes the check run again.
        sources_state=lambda wc: sources_state(Path(VERIFY[wc.name]), Path("resources/models")),
        device=lookup(dpath="smoke/device", within=config),
        max_new_tokens=lookup(dpath="smoke/max_new_tokens", within=config),
        dtype=lookup(dpath="smoke/dtype", within=config),
        memory_gb=lookup(dpath="smoke/memory_gb", within=config, default=None),
    script:
        "../scripts/verify.py"


rule verify:
    input:
        expand("results/verify/{name}/report.json", name=VERIFY),
