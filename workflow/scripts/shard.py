"""Execute the plan rows of one shard: the globals, a run of layers, or the routers (from the gates file)."""
from pathlib import Path

from moeforge.build.shards import shard_step
from moeforge.runner import run

run(snakemake, lambda s: shard_step(Path(s.input.tensors), s.wildcards.shard,  # noqa: F821
                                    [Path(p) for p in s.input.weights],
                                    Path(s.input.gates[0]) if s.input.gates else None,
                                    Path(s.output.shard), Path(s.output.digest)))
