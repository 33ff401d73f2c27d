"""The Hub-ready model directory."""
from pathlib import Path

from moeforge.build.assemble import assemble
from moeforge.runner import run

run(snakemake, lambda s: assemble(Path(s.input.plan), [Path(p) for p in s.input.shards],  # noqa: F821
                                  [Path(p).read_text().strip() for p in s.input.digests],
                                  Path(s.input.config).parent, Path(s.input.checked),
                                  Path(s.input.base_meta),
                                  [Path(p) for p in s.input.hashes], Path(s.output.lock).parent,
                                  [Path(p) for p in s.input.training]))
