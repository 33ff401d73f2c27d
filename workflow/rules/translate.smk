# config.json for the output family, with every decision recorded in translation.json.


rule translate_config:
    input:
        plan="results/{merge}/plan.json",
        base_meta=lambda wc: f"resources/models/{base_slug(wc)}/meta",
    output:
        config="results/{merge}/config/config.json",
        generation="results/{merge}/config/generation_config.json",
        translation="results/{merge}/config/translation.json",
    log:
        "logs/{merge}/translate_config.log",
    # The gates job waits for it: on the longest chain before assembly, as the gates are.
    priority: 1
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/translate_config.py"
