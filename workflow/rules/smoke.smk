# Prove the build works: strict load, generation, comparison with the base, routing statistics; on the
# staging model, which is published only when this passes.


rule smoke_test:
    input:
        lock="results/{merge}/staging/model/moeforge.lock.json",
        plan="results/{merge}/plan.json",
        gates=lambda wc: gates_of(wc.merge, ".json"),
        translation="results/{merge}/config/translation.json",
        base_weights=lambda wc: f"resources/models/{base_slug(wc)}/weights.json",
    output:
        json="results/{merge}/smoke/report.json",
        md="results/{merge}/smoke/report.md",
        load=report(
            "results/{merge}/smoke/expert_load.png",
            caption="../report/expert_load.rst",
            category="{merge}",
            labels=figure_labels("expert load", smoke_label),
        ),
        similarity=report(
            "results/{merge}/smoke/gate_similarity.png",
            caption="../report/gate_similarity.rst",
            category="{merge}",
            labels=figure_labels("gate similarity", smoke_label),
        ),
    log:
        log="logs/{merge}/smoke_test.log",
        # The verdict and where the checked model stands: kept when the job fails, unlike its outputs.
        outcome="logs/{merge}/smoke_test.json",
    # Wall time and peak memory of every job: what a cluster profile should ask for.
    benchmark:
        "results/{merge}/benchmarks/smoke_test.tsv"
    # torch's threads (Snakemake sets OMP_NUM_THREADS): the plan's (moeforge.resources.smoke_threads), one on a
    # small model, so that a search's candidates are checked side by side.
    threads: smoke_threads
    resources:
        mem_mb=smoke_mem_mb,
        runtime=60,
    params:
        device=lookup(dpath="smoke/device", within=config),
        max_new_tokens=lookup(dpath="smoke/max_new_tokens", within=config),
        dtype=lookup(dpath="smoke/dtype", within=config),
        # Overrides the memory budget read from the job's cgroup or mem_mb (see moeforge.runtime.memory_budget).
        memory_gb=lookup(dpath="smoke/memory_gb", within=config, default=None),
    script:
        "../scripts/smoke_test.py"
