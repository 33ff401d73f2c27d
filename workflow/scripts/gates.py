"""The plan against the installed transformers class, then the router matrices of every layer.

One job for both: each needs torch and transformers' model classes, whose import costs more than the
work itself on a small model. The check runs first, so a planning fault fails before any router is computed.
"""
from pathlib import Path

from moeforge.gates.compute import gates_for_plan
from moeforge.plan.class_check import class_check
from moeforge.runner import run


def _step(s) -> None:
    class_check(Path(s.input.plan), Path(s.input.tensors), Path(s.input.config), Path(s.output.checked))
    gates_for_plan(Path(s.input.plan), Path(s.input.base_weights), Path(s.output.tensors), Path(s.output.stats))


run(snakemake, _step)  # noqa: F821
