"""Download (Hub) or locate (local) one model's weights; record where and their sha256."""
from pathlib import Path

from moeforge.io.fetch import fetch_weights
from moeforge.runner import run

run(snakemake, lambda s: fetch_weights(Path(s.input.meta) / "source.json", Path(s.output[0])))  # noqa: F821
