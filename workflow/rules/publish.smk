# A model that passed its smoke test, published where a finished model stands: hard links to the staging
# model's files, renamed into place whole. A model that failed never stands here.


rule publish:
    input:
        staging="results/{merge}/staging/model/moeforge.lock.json",
        # After the smoke test passed; a rerun of the smoke test alone (a changed smoke setting) does not
        # publish the same files again.
        smoke=ancient("results/{merge}/smoke/report.json"),
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
