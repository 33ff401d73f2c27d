# config.json for the output family, with every decision recorded in translation.json; then the plan checked
# against the installed transformers class built from that config (on the meta device: no weights, no memory).


rule translate_config:
    input:
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
        base_meta=lambda wc: f"resources/models/{base_slug(wc)}/meta",
    output:
        config="results/{merge}/config/config.json",
        generation="results/{merge}/config/generation_config.json",
        translation="results/{merge}/config/translation.json",
        # Assembly waits for it: no model directory from a plan the class does not match.
        checked="results/{merge}/class_check.json",
    log:
        "logs/{merge}/translate_config.log",
    # Router training waits for it (the config it trains under): on the longest chain before assembly.
    priority: 1
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/translate_config.py"
