# `lock:` merges: the recorded recipe built again, then compared with the recorded merge.


rule lock_recipe:
    input:
        lock=lambda wc: str(LOCKS[wc.merge].ref.path),
        # The recorded local weight files: checked byte for byte (an edit in place reruns the check).
        local=lambda wc: LOCKS[wc.merge].local_files(),
    output:
        recipe="results/{merge}/reproduce/recipe.yaml",
        record="results/{merge}/reproduce/sources.json",
    log:
        "logs/{merge}/lock_recipe.log",
    benchmark:
        "results/{merge}/benchmarks/lock_recipe.tsv"
    resources:
        mem_mb=500,
        runtime=120,
    script:
        "../scripts/lock_recipe.py"


rule reproduce:
    input:
        lock="results/{merge}/model/moeforge.lock.json",
        recorded=lambda wc: LOCKS[wc.merge].ref.local_files(),
        plan="results/{merge}/plan.json",
    output:
        json="results/{merge}/reproduce/report.json",
        md="results/{merge}/reproduce/report.md",
    params:
        ref=lambda wc: MERGE_TABLE[wc.merge]["lock"],
    log:
        "logs/{merge}/reproduce.log",
    benchmark:
        "results/{merge}/benchmarks/reproduce.tsv"
    resources:
        mem_mb=reproduce_mem_mb,
        runtime=120,
    # A Hub merge's published files are downloaded into the Hugging Face cache, as fetch rules do.
    localrule: True
    script:
        "../scripts/reproduce.py"
