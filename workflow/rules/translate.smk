# config.json for the output family, with every decision recorded in translation.json; then the plan checked
# against the installed transformers class built from that config (on the meta device: no weights, no memory).


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
    # Router training waits for it (the config it trains under): on the longest chain before assembly.
    priority: 1
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    script:
        "../scripts/translate_config.py"


# Named by what it reads (moeforge.plan.class_check): the output config and the planned shapes, so merges and
# search candidates that differ in neither (gate mode, prompts, router training) share one job and one record.
# Assembly waits for it: no model directory from a plan the class does not match.
rule class_check:
    input:
        # The base's config, which the settings are built from. An input function: it finds the merge that
        # provides the settings, waiting for the validate checkpoints that takes.
        base_meta=class_check_base_meta,
    output:
        checked="results/class_checks/{check_key}.json",
    log:
        "logs/class_checks/{check_key}.log",
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        settings=class_check_job_settings,
    script:
        "../scripts/class_check.py"
