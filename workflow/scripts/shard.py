"""Execute the plan rows of one shard (the globals or a run of layers; the gates job writes the routers')."""
from pathlib import Path

from moeforge.build.shards import shard_step
from moeforge.runner import run

run(snakemake, lambda s: shard_step(Path(s.input.tensors), s.wildcards.shard,  # noqa: F821
                                    [Path(p) for p in s.input.weights], None,
                                    Path(s.output.shard), Path(s.output.digest)))
