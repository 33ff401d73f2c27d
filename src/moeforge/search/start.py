"""Where a search starts: a recipe document, given as ``merges:`` entries give one.

A grid changes keys of a recipe *document* (the YAML as written), not of the typed Recipe, so that
every recipe key, including keys added later, can be searched, and each candidate is validated by
the recipe's own parsing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from moeforge.errors import MoeforgeError, RecipeError
from moeforge.io.files import read_text
from moeforge.io.yaml_doc import parse_yaml
from moeforge.plan.lock_merge import merge_from_lock, pinned_recipe
from moeforge.plan.published_merge import merge_from_published
from moeforge.plan.recipe import Recipe, parse_recipe, without_nulls

#: The keys that name a search's starting point, as under ``merges:``.
START_KEYS = ("recipe", "lock", "published")


def start_document(spec: Mapping[str, Any], where: str) -> tuple[dict[str, Any], Recipe]:
    """The starting recipe document (unset keys left out) and its parsed Recipe.

    ``lock:`` starts from the recorded recipe with its Hub sources pinned to the recorded commits;
    ``published:`` from the recipe found in the published repo. Neither is compared with the
    original here: a search builds new merges.
    """
    if "recipe" in spec:
        path = Path(spec["recipe"])
        if not path.is_file():
            raise RecipeError("recipe file not found", f"{where}: recipe: {path}",
                              "give the path of a recipe file (relative to the working directory)")
        try:
            document = parse_yaml(read_text(path, "", RecipeError, "save the recipe as UTF-8"), str(path), RecipeError)
        except MoeforgeError as exc:
            raise exc.within(f"{where}: recipe") from None
        recipe = parse_recipe(document, f"{where}: recipe: {path}")
        return without_nulls(document), recipe
    key = "lock" if "lock" in spec else "published"
    try:
        if key == "lock":
            merge = merge_from_lock(spec["lock"])
            return pinned_recipe(merge.lock), merge.recipe
        published = merge_from_published(spec["published"])
    except MoeforgeError as exc:
        raise exc.within(f"{where}: {key}") from None
    return without_nulls(published.found.document), published.recipe
