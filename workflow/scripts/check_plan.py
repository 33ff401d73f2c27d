"""The plan against the installed transformers model class, before any shard is written."""
from pathlib import Path

from moeforge.runner import run
from moeforge.validate import check_plan

run(snakemake, lambda s: check_plan(Path(s.input.plan), Path(s.input.tensors), Path(s.input.base_meta),  # noqa: F821
                                    Path(s.output[0])))
