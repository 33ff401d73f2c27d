"""Execute the plan rows of one shard (a layer, or the globals)."""
from pathlib import Path

from moeforge.fileio import write_text
from moeforge.runner import run
from moeforge.shards import read_rows, weight_dirs_from, write_shard


def main(s):
    gates = Path(s.input.gates) if "gates" in s.input.keys() else None
    digest = write_shard(read_rows(Path(s.input.tensors), s.params.shard),
                         weight_dirs_from([Path(p) for p in s.input.weights]), gates, Path(s.output.shard))
    write_text(Path(s.output.digest), digest + "\n")


run(snakemake, main)  # noqa: F821
