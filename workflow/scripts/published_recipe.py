"""A `published:` merge's recipe: read from the published repo and written out as the merge's recipe."""
from pathlib import Path

from moeforge.plan.published_merge import write_published_recipe
from moeforge.runner import run

run(snakemake, lambda s: write_published_recipe(s.params.ref, Path(s.output.recipe),  # noqa: F821
                                                Path(s.output.record)))
