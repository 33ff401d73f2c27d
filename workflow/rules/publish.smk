# A model that passed its smoke test, published where a finished model stands: hard links to the staging
# model's files, renamed into place whole. A model that failed never stands here.


rule publish:
    input:
        staging="results/{merge}/staging/model/moeforge.lock.json",
        smoke="results/{merge}/smoke/report.json",
    output:
        lock=protected("results/{merge}/model/moeforge.lock.json"),
    log:
        "logs/{merge}/publish.log",
    # Seconds of linking: on the submit host, without a queue wait.
    localrule: True
    resources:
        mem_mb=500,
        runtime=10,
    script:
        "../scripts/publish.py"
