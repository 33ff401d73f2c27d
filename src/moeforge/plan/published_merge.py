"""A merge given as ``published: REF``: the recipe a published merge was built from, built again by moeforge.

The recipe is read from the repo when the workflow is parsed (so a missing or broken one stops the
run before any job), then written out as the merge's recipe file by a job, as a ``lock:`` merge's
is, so that validation and every later stage run unchanged. mergekit-moe writes its recipe with
every unset key as null; a recipe leaves such keys out, so they are dropped. Unlike a lock, a
published recipe records no commits: its Hub sources are built as they are now, which the record
says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moeforge.errors import RecipeError
from moeforge.io.files import write_json, write_text
from moeforge.io.lockfile import LOCK_NAME
from moeforge.io.published import FoundRecipe, PublishedRef, find_recipe, resolve_published
from moeforge.io.refs import parse_ref
from moeforge.plan.recipe import Recipe, parse_recipe, without_nulls


@dataclass(frozen=True)
class PublishedMerge:
    """A ``published:`` merge as the workflow needs it when parsed: where the model is, and its recipe."""

    ref: PublishedRef
    found: FoundRecipe
    recipe: Recipe


def merge_from_published(raw: str) -> PublishedMerge:
    """Parse time: find the published merge and its recipe, and validate the recipe."""
    ref, directory = resolve_published(raw)
    found = find_recipe(directory, raw)
    recipe = parse_recipe(found.document, f"{raw}: {found.source}")
    _check_local_sources(recipe, directory, f"{raw}: {found.source}")
    return PublishedMerge(ref, found, recipe)


def _check_local_sources(recipe: Recipe, directory: Path, where: str) -> None:
    """A merge moeforge built from local models names them in its card by name only (a path of the machine that
    built it means nothing to a reader); its lock records where each was and its content. Rebuilt from the card,
    those names are directories that are not here: the lock is the way to rebuild it."""
    missing = [ref for ref in recipe.source_models
               if parse_ref(ref).kind == "local" and not Path(parse_ref(ref).path or ref).expanduser().is_dir()]
    lock = directory / LOCK_NAME
    if missing and lock.is_file():
        raise RecipeError(
            f"the recipe names local models that are not here ({', '.join(missing)}): moeforge built this merge, "
            "and its card names local models by name only, where its lock records each one's path and content",
            where, f"rebuild it from its lock: lock: {lock}")


def write_published_recipe(raw: str, recipe_out: Path, record_out: Path) -> dict[str, Any]:
    """The job before validation: the published recipe written out as this merge's recipe, and where it came from."""
    merge = merge_from_published(raw)
    unpinned = [ref for ref in merge.recipe.source_models
                if parse_ref(ref).kind == "hub" and parse_ref(ref).revision is None]
    record = {"published": raw, "repo_id": merge.ref.repo_id, "revision": merge.ref.revision,
              "recipe_from": merge.found.source, "unpinned_hub_sources": unpinned}
    write_text(recipe_out, yaml.safe_dump(without_nulls(merge.found.document), sort_keys=False,
                                          allow_unicode=True))
    write_json(record_out, record)
    return record
