"""Router matrices for every layer, computed from the base model."""
from pathlib import Path

from moeforge.gates.compute import gates_for_plan
from moeforge.runner import run

run(snakemake, lambda s: gates_for_plan(Path(s.input.plan), Path(s.input.base_weights),  # noqa: F821
                                        Path(s.output.tensors), Path(s.output.stats), threads=s.threads))
