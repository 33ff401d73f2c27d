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
    # Tiny, and the gates job (the longest before assembly) waits for it and the base's weights alone:
    # it runs beside the base's fetch_weights job (priority 11), before the experts' (10).
    priority: 12
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/translate_config.py"
