"""Build the offline demo models (tiny, seeded, with a real tokenizer)."""
from pathlib import Path

from moeforge.demo.tiny_models import build_demo
from moeforge.runner import run

run(snakemake, lambda s: build_demo(Path(s.params.root)))  # noqa: F821
