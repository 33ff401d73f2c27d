"""The router matrices of every layer, from the gate settings shared by the merges that need them."""
from pathlib import Path

from moeforge.gates.compute import gates_for_settings
from moeforge.runner import run

run(snakemake, lambda s: gates_for_settings(s.params.settings, Path(s.input.base_weights),  # noqa: F821
                                            Path(s.output.tensors), Path(s.output.stats)))
