# Prove the build works: strict load, generation, comparison with the base, routing statistics.


rule smoke_test:
    input:
        lock="results/{merge}/model/moeforge.lock.json",
        plan="results/{merge}/plan.json",
        gates="results/{merge}/gates.json",
        translation="results/{merge}/config/translation.json",
        base_weights=lambda wc: f"resources/models/{base_slug(wc)}/weights.json",
    output:
        json="results/{merge}/smoke/report.json",
        md="results/{merge}/smoke/report.md",
        load=report(
            "results/{merge}/smoke/expert_load.png",
            caption="../report/expert_load.rst",
            category="{merge}",
            labels={"merge": "{merge}", "figure": "expert load"},
        ),
        similarity=report(
            "results/{merge}/smoke/gate_similarity.png",
            caption="../report/gate_similarity.rst",
            category="{merge}",
            labels={"merge": "{merge}", "figure": "gate similarity"},
        ),
    params:
        device=config.get("smoke", {}).get("device", "cpu"),
        max_new_tokens=config.get("smoke", {}).get("max_new_tokens", 16),
        dtype=config.get("smoke", {}).get("dtype", "auto"),
    log:
        "logs/{merge}/smoke_test.log",
    # Wall time and peak memory of every job: what a cluster profile should ask for.
    benchmark:
        "results/{merge}/benchmarks/smoke_test.tsv"
    resources:
        mem_mb=smoke_mem_mb,
        runtime=60,
    conda:
        "../../envs/moeforge.yaml"
    script:
        "../scripts/smoke_test.py"
