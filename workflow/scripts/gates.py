"""The plan against the installed transformers class, the router matrices of every layer, the routers shard.

One job for the first two: each needs torch and transformers' model classes, whose import costs more
than the work itself on a small model. The check runs first, so a planning fault fails before any
router is computed.
The routers shard is the one shard that reads the gates alone; written here, assembly needs no job
between the gates and itself.
"""
from pathlib import Path

from moeforge.build.shards import shard_step
from moeforge.gates.compute import gates_for_plan
from moeforge.plan.class_check import class_check
from moeforge.plan.table import ROUTERS_SHARD
from moeforge.runner import run


def _step(s) -> None:
    class_check(Path(s.input.plan), Path(s.input.tensors), Path(s.input.config), Path(s.output.checked))
    gates_for_plan(Path(s.input.plan), Path(s.input.base_weights), Path(s.output.tensors), Path(s.output.stats),
                   threads=s.threads)
    shard_step(Path(s.input.tensors), ROUTERS_SHARD, [], Path(s.output.tensors), Path(s.output.routers),
               Path(s.output.routers_digest))


run(snakemake, _step)  # noqa: F821
