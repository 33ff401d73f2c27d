# `snakemake eval`: how close each MoE comes to its best dense expert on each domain, and where tokens go.
from moeforge.io.domains import eval_domains

try:
    EVAL_DOMAINS = eval_domains(lookup(dpath="eval/domains", within=config, default=None))
except MoeforgeError as exc:
    raise WorkflowError(f"moeforge: {exc}") from None
# The demo's evaluation is part of the default target, so a first run shows what its routing achieves;
# a user's merges are evaluated on request (`snakemake eval`).
EVAL_BY_DEFAULT = [] if config.get("merges") or config.get("recipe") else MERGES


rule evaluate:
    input:
        lock="results/{merge}/model/moeforge.lock.json",
        plan="results/{merge}/plan.json",
        weights=weight_records,
        domains=list(EVAL_DOMAINS.values()),
    output:
        json="results/{merge}/eval/report.json",
        md="results/{merge}/eval/report.md",
        png=report(
            "results/{merge}/eval/perplexity.png",
            caption="../report/evaluation.rst",
            category="{merge}",
            labels=figure_labels("perplexity per domain", eval_label),
        ),
    log:
        "logs/{merge}/eval.log",
    benchmark:
        "results/{merge}/benchmarks/eval.tsv"
    resources:
        mem_mb=eval_mem_mb,
        runtime=60,
    params:
        domains=EVAL_DOMAINS,
        context=lookup(dpath="eval/context", within=config),
        max_tokens=lookup(dpath="eval/max_tokens", within=config),
        device=lookup(dpath="eval/device", within=config),
    script:
        "../scripts/eval.py"


rule eval:
    input:
        expand("results/{merge}/eval/report.json", merge=MERGES),
