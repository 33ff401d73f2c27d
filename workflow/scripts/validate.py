"""Pre-flight validation: plan.json and plan.tensors.tsv, from metadata only."""
from pathlib import Path

from moeforge.plan.validate import validate_merge
from moeforge.runner import run


def main(s):
    validate_merge(s.params.name, Path(s.input.recipe), {r: Path(p) for r, p in s.params.refs.items()},
                   Path(s.output.plan), Path(s.output.tensors))


run(snakemake, main)  # noqa: F821
