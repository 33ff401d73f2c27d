# `snakemake eval`: how close each MoE comes to its best dense expert on each domain, and where tokens go.
from moeforge.io.domains import eval_domains, eval_key

try:
    EVAL_DOMAINS = eval_domains(lookup(dpath="eval/domains", within=config, default=None))
except MoeforgeError as exc:
    raise WorkflowError(f"moeforge: {exc}") from None
EVAL_OPTIONS = {key: lookup(dpath=f"eval/{key}", within=config) for key in ("context", "max_tokens", "device")}
# Names the dense scores of this setting (texts and options), which every merge over the same models shares.
EVAL_KEY = eval_key(EVAL_DOMAINS, EVAL_OPTIONS)
# The demo's evaluation is part of the default target, so a first run shows what its routing achieves;
# a user's merges are evaluated on request (`snakemake eval`).
EVAL_BY_DEFAULT = [] if config.get("merges") or config.get("recipe") else MERGES


rule score_dense:
    input:
        # Where the model's weights are: a changed model reruns the job (its located record is rewritten).
        located="resources/models/{slug}/weights.json",
        # Where the weights are (see source_weight_record): a local model's located record, which names no
        # merge, so a run with other merges or another grid does not rescore it; a Hub model's as the first
        # merge that needs it fetched (downloaded) it, whose revalidation, which fetches again, does not make
        # the scores stale.
        weights=lambda wc: ancient(source_weight_record(dense_provider(wc), wc.slug)),
        tokenizer="resources/models/{tokenizer}/meta",
        domains=list(EVAL_DOMAINS.values()),
    output:
        "resources/models/{slug}/eval/{tokenizer}/{key}.json",
    log:
        "logs/score_dense/{slug}/{tokenizer}/{key}.log",
    benchmark:
        "resources/models/{slug}/benchmarks/score_dense-{tokenizer}-{key}.tsv"
    wildcard_constraints:
        tokenizer=one_of(REFS),
        key=EVAL_KEY,
    resources:
        mem_mb=dense_eval_mem_mb,
        runtime=60,
    params:
        domains=EVAL_DOMAINS,
        options=EVAL_OPTIONS,
    script:
        "../scripts/score_dense.py"


rule evaluate:
    input:
        lock="results/{merge}/model/moeforge.lock.json",
        plan="results/{merge}/plan.json",
        dense=lambda wc: list(dense_scores(wc).values()),
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
        options=EVAL_OPTIONS,
        dense=dense_scores,
    script:
        "../scripts/eval.py"


rule eval:
    input:
        expand("results/{merge}/eval/report.json", merge=MERGES),
