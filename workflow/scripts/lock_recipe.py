"""A `lock:` merge's recipe: local sources checked against the lock, Hub sources pinned, written out."""
from pathlib import Path

from moeforge.plan.lock_merge import write_lock_recipe
from moeforge.runner import run

run(snakemake, lambda s: write_lock_recipe(Path(s.input.lock), Path(s.output.recipe),  # noqa: F821
                                           Path(s.output.record)))
