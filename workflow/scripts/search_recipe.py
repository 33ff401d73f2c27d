"""A search candidate's recipe: the starting recipe with the candidate's grid values, written out."""
from pathlib import Path

from moeforge.runner import run
from moeforge.search.grid import write_candidate_recipe

run(snakemake, lambda s: write_candidate_recipe(s.params.document, Path(s.output.recipe)))  # noqa: F821
