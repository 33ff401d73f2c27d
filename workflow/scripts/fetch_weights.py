"""Download (Hub) or find (local) one model's weights for one merge; check them; record where and their sha256."""
from pathlib import Path

from moeforge.io.fetch import fetch_weights
from moeforge.runner import run

run(snakemake, lambda s: fetch_weights(Path(s.input.weights), Path(s.output[0]), Path(s.params.cache)))  # noqa: F821
