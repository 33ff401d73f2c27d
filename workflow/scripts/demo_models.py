"""Build the offline demo models (tiny, seeded, with a real tokenizer)."""
from pathlib import Path

from moeforge.runner import job_imports, run

with job_imports():
    from moeforge.demo.tiny_models import build_demo

run(snakemake, lambda s: build_demo(Path(s.params.root)))  # noqa: F821
