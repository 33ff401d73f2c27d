"""The plan against the installed transformers model class, before any shard is written."""
from pathlib import Path

from moeforge.plan.class_check import class_check
from moeforge.runner import run

run(snakemake, lambda s: class_check(Path(s.input.plan), Path(s.input.tensors), Path(s.input.config),  # noqa: F821
                                     Path(s.output[0])))
