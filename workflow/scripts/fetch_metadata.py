"""Config, tokenizer and safetensors headers of one model, without its weights."""
from pathlib import Path

from moeforge.io.fetch import fetch_metadata
from moeforge.runner import run

run(snakemake, lambda s: fetch_metadata(s.params.ref, Path(s.output[0]),  # noqa: F821
                                        Path(s.input[0]) if s.input else None))
