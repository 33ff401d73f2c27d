"""Execute the plan rows of one shard (a layer, or the globals)."""
from pathlib import Path

from moeforge.plan import read_plan_rows
from moeforge.runner import run
from moeforge.shards import weight_dirs_from, write_shard


def main(s):
    gates = Path(s.input.gates) if "gates" in s.input.keys() else None
    write_shard(read_plan_rows(Path(s.input.tensors), s.params.shard),
                weight_dirs_from([Path(p) for p in s.input.weights]), gates, Path(s.output[0]))


run(snakemake, main)  # noqa: F821
