"""Per-domain perplexity of base, experts, MoE and oracle, routing shares: report and figure."""
from pathlib import Path

from moeforge.check.evaluate import EvalOptions, eval_stage
from moeforge.runner import run


def main(s):
    eval_stage(Path(s.input.lock).parent, Path(s.input.plan), {slug: Path(p) for slug, p in s.params.dense.items()},
               {name: Path(path) for name, path in s.params.domains.items()}, EvalOptions(**s.params.options),
               Path(s.output.json), Path(s.output.md), Path(s.output.png))


run(snakemake, main)  # noqa: F821
