"""sha256 of one model's weight files, for the lock file (off the shard jobs' critical path)."""
from pathlib import Path

from moeforge.io.fetch import hash_weights
from moeforge.runner import run

run(snakemake, lambda s: hash_weights(Path(s.input.meta) / "source.json", Path(s.input.weights),  # noqa: F821
                                      Path(s.output[0])))
