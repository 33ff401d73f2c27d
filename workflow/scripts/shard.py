"""Execute the plan rows of one shard read from the source models: the globals or a run of layers."""
from pathlib import Path

from moeforge.build.shards import rows_step
from moeforge.runner import run

run(snakemake, lambda s: rows_step(s.params.rows, [Path(p) for p in s.input.weights], None,  # noqa: F821
                                   Path(s.output.shard), Path(s.output.digest)))
