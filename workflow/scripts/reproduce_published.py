"""Compare a rebuilt `published:` merge with the published one, tensor by tensor, whatever its layout."""
from pathlib import Path

from moeforge.check.published import reproduce_published
from moeforge.runner import run

run(snakemake, lambda s: reproduce_published(s.wildcards.merge, s.params.ref,  # noqa: F821
                                             Path(s.input.model).parent, Path(s.input.plan), Path(s.input.record),
                                             Path(s.output.json), Path(s.output.md)))
