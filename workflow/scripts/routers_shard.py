"""Execute the plan rows of the routers shard: the router matrices, from the gates file."""
from pathlib import Path

from moeforge.build.shards import shard_step
from moeforge.plan.table import ROUTERS_SHARD
from moeforge.runner import run

run(snakemake, lambda s: shard_step(Path(s.input.tensors), ROUTERS_SHARD, [], Path(s.input.gates),  # noqa: F821
                                    Path(s.output.shard), Path(s.output.digest)))
