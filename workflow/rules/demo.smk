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


# The demo experts' training texts (the packaged train splits), where the demo recipe's train_texts name them.
rule demo_texts:
    output:
        code=f"{DEMO_ROOT}/texts/code.txt",
        math=f"{DEMO_ROOT}/texts/math.txt",
        cooking=f"{DEMO_ROOT}/texts/cooking.txt",
    log:
        "logs/demo_texts.log",
    localrule: True
    resources:
        mem_mb=500,
        runtime=5,
    params:
        root=lambda wc, output: Path(output.code).parent,
    script:
        "../scripts/demo_texts.py"
