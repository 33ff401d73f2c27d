# moeforge: build a Mixture-of-Experts checkpoint from dense checkpoints.
#   snakemake --cores 2                                   the offline demo
#   snakemake --cores 8 --config recipe=path/to/name.yaml one recipe, merge "name"
#   snakemake --cores 8 --configfile my.yaml              the merges listed in my.yaml
#                                                         (recipe: a YAML recipe, lock: a build to rerun,
#                                                          or published: a published merge to rebuild)
#   snakemake search --cores 8 --configfile my.yaml       the searches in my.yaml (docs/search.md)
# Targets go before --configfile/--config, which take several values.
import os
import sys

from snakemake.utils import min_version, validate

from moeforge.check.summary import run_summary
from moeforge.errors import MoeforgeError
from moeforge.io.fetch import check_new_refs
from moeforge.plan.workflow_config import checked_config

min_version("9")


# The defaults ship with the workflow, so any working directory (-d) can run it.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


try:
    config.update(checked_config(config))
except MoeforgeError as exc:
    raise WorkflowError(f"moeforge: {exc}") from None
# Fills in the schema's defaults.
validate(config, "schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/gates.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/shards.smk"
include: "workflow/rules/translate.smk"
include: "workflow/rules/assemble.smk"
include: "workflow/rules/smoke.smk"
include: "workflow/rules/publish.smk"
include: "workflow/rules/gguf.smk"
include: "workflow/rules/verify.smk"
include: "workflow/rules/reproduce.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/search.smk"


# A model not fetched yet whose local path does not exist (or is one typo away from one) is refused now, so a
# dry run catches it too, naming where the config gave it; the demo's models are built by a rule of the run.
try:
    check_new_refs(
        REFS,
        Path("resources/models"),
        built_here=[str(p) for p in rules.demo_models.output],
        used_by=REF_GIVEN_BY,
    )
except MoeforgeError as exc:
    raise WorkflowError(f"moeforge: {exc}") from None


# At the end of every run: where each merge's model and reports are, and one line per check.
onsuccess:
    print(run_summary(MERGES, searches={n: s.record() for n, s in SEARCHES.items()}), file=sys.stderr)


onerror:
    print(run_summary(MERGES, searches={n: s.record() for n, s in SEARCHES.items()}), file=sys.stderr)


rule all:
    default_target: True
    input:
        # The published model, and its smoke test: a deleted model is published again from staging.
        expand("results/{merge}/model/moeforge.lock.json", merge=MERGES),
        expand("results/{merge}/smoke/report.json", merge=MERGES),
        expand("results/{merge}/reproduce/report.json", merge=REBUILDS),
        expand("results/{merge}/eval/report.json", merge=EVAL_BY_DEFAULT),
        expand("results/search/{name}/ranking.json", name=SEARCHES),
