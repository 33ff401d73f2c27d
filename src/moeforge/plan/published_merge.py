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

from moeforge.io.files import write_json, write_text
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
    return PublishedMerge(ref, found, recipe)


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
