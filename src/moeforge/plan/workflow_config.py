"""The workflow config, checked as the user gave it, before Snakemake fills in the schema's defaults.

Snakemake's own validation prints the whole JSON schema after its first error and names neither
the config file nor the key to fix; an empty ``merges:`` would pass it and build the demo. Here
each problem is one line with its key path (and the key meant, for a typo), and a ``merges:`` that
lists nothing is refused: the demo is built only where the user asked for no merge at all.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from moeforge.errors import RecipeError
from moeforge.io.schema import (
    first_and_more,
    integral_floats_as_int,
    non_json_problems,
    nonfinite_problems,
    package_schema,
    schema_errors,
)
from moeforge.io.yaml_doc import check_bounded

WHERE = "workflow config (config/config.yaml, then each --configfile, then --config)"
#: How each section's entries are written, for the fix of a problem under it.
SECTION_FORMS = {
    "merges": "each merge is name: {recipe: PATH}, {lock: ...} or {published: ...}",
    "searches": "each search is name: {recipe: PATH (or lock: / published:), grid: {key: [value, ...]}} (docs/search.md)",
}


def checked_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` checked against the workflow schema, integral floats where it asks for integers made ints.

    Its size is checked first: Snakemake has read the YAML, aliases shared, and validating expands them.
    """
    check_bounded(config, WHERE, RecipeError)
    if "merges" in config and not config["merges"]:
        raise RecipeError("merges: lists no merge", WHERE,
                          "list each merge as name: {recipe: path/to/recipe.yaml} (or lock: / published:), or "
                          "leave merges: out to build the offline demo")
    if "searches" in config and not config["searches"]:
        raise RecipeError("searches: lists no search", WHERE,
                          "list each search as name: {recipe: path/to/recipe.yaml, grid: {key: [value, ...]}}, or "
                          "leave searches: out")
    problems = (schema_errors(dict(config), package_schema("config")) + nonfinite_problems(dict(config))
                + non_json_problems(dict(config)))
    if problems:
        section = re.split(r"[.:\[]", problems[0], maxsplit=1)[0]
        form = f"{SECTION_FORMS[section]}; " if section in SECTION_FORMS else ""
        raise RecipeError(first_and_more(problems), WHERE,
                          f"fix that key: {form}every key is described in schemas/config.schema.yaml")
    return integral_floats_as_int(dict(config), package_schema("config"))
