"""Which merges a run builds: the run you name is the run you get.

Snakemake merges every ``--configfile`` into the workflow's own ``config/config.yaml``, so a
merge listed there would be built by every run. The workflow config therefore lists no merges;
it names the demo, which is built only when the user gives none (neither ``merges:`` in a config
file nor ``--config recipe=PATH``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from moeforge.errors import RecipeError
from moeforge.io.names import MERGE_NAME_RULE, check_merge_name, is_merge_name


def merge_from_recipe_path(path: str) -> tuple[str, dict[str, str]]:
    """``--config recipe=path/to/name.yaml``: one merge, named after the file (as mergekit-moe's output dir)."""
    name = Path(path).stem
    if not is_merge_name(name):
        raise RecipeError(f"the recipe file name {name!r} cannot name a merge", path,
                          f"rename the file ({MERGE_NAME_RULE}), or list it under merges: in a config file with a "
                          "name of your choice")
    return name, {"recipe": path}


def merges_to_build(config: Mapping[str, Any], workflow_dir: Path = Path(".")) -> dict[str, dict[str, str]]:
    """The user's merges (``merges:``, each a ``recipe:``, a ``lock:`` or a ``published:``, plus ``recipe=``), or
    the demo when the user names none, no model to ``verify:`` and no search either.

    The demo's recipe ships with the workflow: its path is relative to ``workflow_dir``, so the demo runs in
    any working directory (``-d``), its models built there.
    """
    merges = dict(config.get("merges") or {})
    if config.get("recipe"):
        name, spec = merge_from_recipe_path(config["recipe"])
        if name in merges and merges[name] != spec:
            raise RecipeError(f"merge {name!r} is named twice: by recipe={config['recipe']} and under merges:",
                              "config", "rename the recipe file or the entry under merges:")
        merges[name] = spec
    # A config that only checks models built elsewhere, or only searches (whose candidates are merges of their
    # own), builds no merge of its own.
    if not merges and (config.get("verify") or config.get("searches")):
        return {}
    if not merges and not config.get("demo"):
        raise RecipeError("no merges to build", "config",
                          "give one recipe with --config recipe=path/to/name.yaml, or merges: in a config file")
    if not merges:
        demo = dict(config["demo"])
        demo["recipe"] = str(Path(workflow_dir) / demo["recipe"])
        merges = {"demo": demo}
    for name in merges:
        check_merge_name(name, "config: merges", RecipeError)
    return merges
