# Pre-flight validation from metadata only; the plan is the single truth for every later job.


checkpoint validate:
    input:
        recipe=lambda wc: config["merges"][wc.merge]["recipe"],
        meta=meta_dirs,
    output:
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
    params:
        refs=lambda wc: {ref: f"resources/models/{slug(ref)}/meta" for ref in RECIPES[wc.merge].source_models},
    log:
        "logs/{merge}/validate.log",
    # Wall time and peak memory of every job: what a cluster profile should ask for.
    benchmark:
        "results/{merge}/benchmarks/validate.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/moeforge.yaml"
    script:
        "../scripts/validate.py"


rule check_plan:
    input:
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
        base_meta=lambda wc: f"resources/models/{base_slug(wc)}/meta",
    output:
        "results/{merge}/class_check.json",
    log:
        "logs/{merge}/check_plan.log",
    benchmark:
        "results/{merge}/benchmarks/check_plan.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/moeforge.yaml"
    script:
        "../scripts/check_plan.py"
