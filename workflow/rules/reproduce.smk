# `lock:` and `published:` merges: a recipe built again, then compared with the merge it came from.
# Each kind has its own pair of rules (same outputs), told apart by which merges they match.


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
    wildcard_constraints:
        merge=one_of(LOCKS),
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
    log:
        "logs/{merge}/reproduce.log",
    benchmark:
        "results/{merge}/benchmarks/reproduce.tsv"
    wildcard_constraints:
        merge=one_of(LOCKS),
    # A Hub merge's published files are downloaded into the Hugging Face cache, as fetch rules do.
    localrule: True
    resources:
        mem_mb=reproduce_mem_mb,
        runtime=120,
    params:
        ref=lambda wc: MERGE_TABLE[wc.merge]["lock"],
    script:
        "../scripts/reproduce.py"


rule published_recipe:
    input:
        # A local published merge's recipe files (an edit in place reruns the rebuild); a Hub commit's do not change.
        published=lambda wc: PUBLISHED[wc.merge].ref.local_files(RECIPE_FILES),
    output:
        recipe="results/{merge}/reproduce/recipe.yaml",
        record="results/{merge}/reproduce/sources.json",
    log:
        "logs/{merge}/published_recipe.log",
    benchmark:
        "results/{merge}/benchmarks/published_recipe.tsv"
    wildcard_constraints:
        merge=one_of(PUBLISHED),
    # The recipe is read from the Hub repo (or the Hugging Face cache), as fetch rules do.
    localrule: True
    resources:
        mem_mb=500,
        runtime=120,
    params:
        ref=lambda wc: MERGE_TABLE[wc.merge]["published"],
    script:
        "../scripts/published_recipe.py"


rule reproduce_published:
    input:
        model="results/{merge}/model/moeforge.lock.json",
        published=lambda wc: PUBLISHED[wc.merge].ref.local_files(),
        plan="results/{merge}/plan.json",
        record="results/{merge}/reproduce/sources.json",
    output:
        json="results/{merge}/reproduce/report.json",
        md="results/{merge}/reproduce/report.md",
    log:
        "logs/{merge}/reproduce.log",
    benchmark:
        "results/{merge}/benchmarks/reproduce.tsv"
    wildcard_constraints:
        merge=one_of(PUBLISHED),
    # The published weights are downloaded into the Hugging Face cache, as fetch rules do.
    localrule: True
    resources:
        mem_mb=published_compare_mem_mb,
        runtime=120,
    params:
        ref=lambda wc: MERGE_TABLE[wc.merge]["published"],
    script:
        "../scripts/reproduce_published.py"
