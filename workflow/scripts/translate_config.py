"""config.json, generation_config.json and translation.json for the output family."""
from pathlib import Path

from moeforge.plan.translate import translate
from moeforge.runner import run

run(snakemake, lambda s: translate(Path(s.input.plan), Path(s.input.base_meta), Path(s.output.config).parent))  # noqa: F821
