"""Execute the plan rows of one shard read from the source models: the globals or a run of layers."""
from pathlib import Path

from moeforge.build.shards import shard_step
from moeforge.runner import run

run(snakemake, lambda s: shard_step(Path(s.input.tensors), s.params.shard,  # noqa: F821
                                    [Path(p) for p in s.input.weights], None,
                                    Path(s.output.shard), Path(s.output.digest)))
