"""Train the merge's routers on its experts' texts (the recipe's router_training)."""
from pathlib import Path

from moeforge.runner import run
from moeforge.train.stage import train_routers

run(snakemake, lambda s: train_routers(  # noqa: F821
    Path(s.input.plan), Path(s.input.tensors), Path(s.input.gates), [Path(p) for p in s.input.shards],
    Path(s.input.config).parent, Path(s.input.base_meta), Path(s.output.tensors), Path(s.output.report),
    Path(s.output.markdown), Path(s.output.figure), job_mem_mb=s.resources.mem_mb))
