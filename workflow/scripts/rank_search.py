"""A search's candidates ranked from their eval reports: ranking.json, ranking.md and a figure."""
from pathlib import Path

from moeforge.runner import run
from moeforge.search.ranking import rank_stage

run(snakemake, lambda s: rank_stage(s.params.search, [Path(p) for p in s.input.evals],  # noqa: F821
                                    [Path(p) for p in s.input.smoke], Path(s.output.json), Path(s.output.md),
                                    Path(s.output.png)))
