"""sha256 of every file of one local source model: its content record (through the stat cache)."""
from pathlib import Path

from moeforge.io.source_content import write_source_content
from moeforge.runner import run

run(snakemake, lambda s: write_source_content(s.params.ref, Path(s.output[0]), Path(s.params.cache)))  # noqa: F821
