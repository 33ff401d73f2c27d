"""The validate step: recipe + sources' metadata -> a checked plan, before any weight is read.

The check of the plan against the installed transformers class (which imports torch and
transformers) is not made here: the gates job, which imports them anyway, makes it first, and
assembly waits for it; validation stays fast on the critical path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from moeforge.plan.gate_settings import recipe_gate_spec, validate_spec
from moeforge.plan.prompt_check import PromptCheck
from moeforge.plan.recipe import load_recipe
from moeforge.plan.translate import build_config


def validate_merge(merge: str, recipe_path: Path, meta_dirs: Mapping[str, Path], plan_json: Path,
                   plan_tsv: Path) -> dict[str, Any]:
    """Validate and plan; the config translation runs too, so its refusals come now.

    The prompts' token check (it needs the base's tokenizer; the smoke test's prompts are checked in every
    gate mode) runs in a helper process meanwhile (see moeforge.plan.prompt_check); nothing is written
    unless it passes too.
    """
    recipe = load_recipe(recipe_path)
    spec = recipe_gate_spec(recipe.to_dict())
    validate_spec(spec)
    with PromptCheck(recipe_path, meta_dirs[recipe.base_model]) as check:
        # Imported once the check runs: pandas and pandera take 0.7 s, which its process overlaps.
        from moeforge.plan.make import make_plan, write_plan

        plan, frame = make_plan(merge, recipe, meta_dirs)
        base_config = json.loads((meta_dirs[recipe.base_model] / "config.json").read_text())
        _, decisions = build_config(plan, base_config)
        check.result()
    plan["warnings"] += [d["warning"] for d in decisions if "warning" in d]
    write_plan(plan, frame, plan_json, plan_tsv)
    return plan
