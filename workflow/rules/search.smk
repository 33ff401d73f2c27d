# Searches: every candidate of a grid built, smoke-tested and evaluated as a merge, then ranked.


rule search_recipe:
    output:
        recipe="results/{merge}/search/recipe.yaml",
    log:
        "logs/{merge}/search_recipe.log",
    wildcard_constraints:
        merge=one_of(CANDIDATES),
    localrule: True
    params:
        # The candidate's recipe document (the search's starting recipe with its grid values): a change reruns it.
        document=lambda wc: CANDIDATES[wc.merge].document,
    script:
        "../scripts/search_recipe.py"


rule rank_search:
    input:
        evals=lambda wc: expand("results/{merge}/eval/report.json", merge=SEARCHES[wc.name].names),
        smoke=lambda wc: expand("results/{merge}/smoke/report.json", merge=SEARCHES[wc.name].names),
    output:
        json="results/search/{name}/ranking.json",
        md="results/search/{name}/ranking.md",
        png=report(
            "results/search/{name}/ranking.png",
            caption="../report/search.rst",
            category="search {name}",
            labels={"search": "{name}", "figure": "ranking"},
        ),
    log:
        "logs/search/{name}/rank.log",
    benchmark:
        "results/search/{name}/benchmarks/rank.tsv"
    wildcard_constraints:
        name=one_of(SEARCHES),
    localrule: True
    params:
        search=lambda wc: SEARCHES[wc.name].record(),
    script:
        "../scripts/rank_search.py"


rule search:
    input:
        searches_to_rank,
