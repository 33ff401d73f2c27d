# `snakemake gguf`: each merge converted to GGUF by llama.cpp's own converter and run in llama-cpp-python
# (tests/setup_llamacpp.sh installs both), compared with transformers on the smoke prompts. Optional: only
# checked models are converted (it follows the smoke test), and the smoke test never waits for it.
from moeforge.check.gguf import gguf_mem_mb


rule gguf_check:
    input:
        lock="results/{merge}/model/moeforge.lock.json",
        plan="results/{merge}/plan.json",
        smoke="results/{merge}/smoke/report.md",
    output:
        # A GGUF that fails its check is kept with its reports in gguf/failed/ for inspection, outside the
        # outputs Snakemake removes when the job fails.
        gguf="results/{merge}/gguf/model-f16.gguf",
        json="results/{merge}/gguf/report.json",
        md="results/{merge}/gguf/report.md",
    log:
        "logs/{merge}/gguf.log",
    benchmark:
        "results/{merge}/benchmarks/gguf.tsv"
    threads: 2
    resources:
        mem_mb=lambda wc, input, attempt: gguf_mem_mb(_plan_beside(input.plan)) * attempt,
        runtime=60,
    script:
        "../scripts/gguf.py"


rule gguf:
    input:
        expand("results/{merge}/gguf/report.json", merge=MERGES),
