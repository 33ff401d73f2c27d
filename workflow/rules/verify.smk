# `snakemake verify`: recheck finished (or downloaded) model directories against their lock files
# and rerun the smoke test. A target rule without outputs, so it runs every time it is asked for.


rule verify:
    input:
        locks=lambda wc: [f"{path}/moeforge.lock.json" for path in VERIFY.values()],
    params:
        models=lambda wc: VERIFY,
        device=config.get("smoke", {}).get("device", "cpu"),
        max_new_tokens=config.get("smoke", {}).get("max_new_tokens", 16),
    log:
        "logs/verify.log",
    localrule: True
    conda:
        "../../envs/moeforge.yaml"
    script:
        "../scripts/verify.py"
