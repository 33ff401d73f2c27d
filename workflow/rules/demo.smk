# The offline demo: tiny seeded dense checkpoints with a real tokenizer, built here.


rule demo_models:
    output:
        tokenizer=directory(f"{DEMO_ROOT}/tokenizer"),
        base=directory(f"{DEMO_ROOT}/base"),
        code=directory(f"{DEMO_ROOT}/expert_code"),
        math=directory(f"{DEMO_ROOT}/expert_math"),
        cooking=directory(f"{DEMO_ROOT}/expert_cooking"),
    log:
        "logs/demo_models.log",
    localrule: True
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        root=lambda wc, output: Path(output.base).parent,
    script:
        "../scripts/demo_models.py"
