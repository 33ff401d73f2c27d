# Pre-flight validation from metadata only; the plan is the single truth for every later job.


checkpoint validate:
    input:
        recipe=lambda wc: MERGE_TABLE[wc.merge]["recipe"],
        meta=meta_dirs,
        # The training texts it checks (router_training only): the demo writes its own.
        texts=train_texts,
    output:
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
    log:
        "logs/{merge}/validate.log",
    # Wall time and peak memory of every job: what a cluster profile should ask for.
    benchmark:
        "results/{merge}/benchmarks/validate.tsv"
    resources:
        mem_mb=lambda wc: job_resources.validate_mem_mb(RECIPES[wc.merge]),
        runtime=10,
    params:
        refs=lambda wc: {ref: f"resources/models/{slug(ref)}/meta" for ref in RECIPES[wc.merge].source_models},
        name=merge_title,
    script:
        "../scripts/validate.py"
