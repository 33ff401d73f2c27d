"""Execute the plan rows of one shard (a layer, or the globals)."""
from pathlib import Path

from moeforge.build.shards import shard_step
from moeforge.runner import run

run(snakemake, lambda s: shard_step(Path(s.input.tensors), s.params.shard,  # noqa: F821
                                    [Path(p) for p in s.input.weights],
                                    Path(s.input.gates) if "gates" in s.input.keys() else None,
                                    Path(s.output.shard), Path(s.output.digest)))
