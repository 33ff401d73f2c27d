"""Config, tokenizer and safetensors headers of one model, without its weights."""
from pathlib import Path

from moeforge.runner import job_imports, run

with job_imports():
    from moeforge.io.fetch import fetch_metadata

run(snakemake, lambda s: fetch_metadata(s.params.ref, Path(s.output[0])))  # noqa: F821
