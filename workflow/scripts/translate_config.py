"""config.json, generation_config.json and translation.json for the output family; then the plan against the
installed transformers class built from that config.json, which a planning fault fails before any assembly."""
from pathlib import Path

from moeforge.plan.class_check import class_check
from moeforge.plan.translate import translate
from moeforge.runner import run


def _step(s) -> None:
    translate(Path(s.input.plan), Path(s.input.base_meta), Path(s.output.config).parent)
    class_check(Path(s.input.plan), Path(s.input.tensors), Path(s.output.config), Path(s.output.checked))


run(snakemake, _step)  # noqa: F821
