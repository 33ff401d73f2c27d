"""The planned tensors under the output config, against the installed transformers class."""
from pathlib import Path

from moeforge.plan.class_check import class_check
from moeforge.runner import run

run(snakemake, lambda s: class_check(s.params.settings, Path(s.output.checked)))  # noqa: F821
