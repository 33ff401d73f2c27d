"""The validate step: recipe + sources' metadata -> a checked plan, before any weight is read.

The check of the plan against the installed transformers class (which imports torch and
transformers) is not made here: translate_config makes it on the config it writes, and assembly
waits for it; validation stays fast on the critical path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping

from moeforge.plan.make import make_plan, write_plan
from moeforge.plan.plan_json import Plan
from moeforge.plan.prompt_check import check_token_inputs
from moeforge.plan.recipe import load_recipe
from moeforge.plan.training_memory import check_training_memory
from moeforge.plan.translate import build_config

log = logging.getLogger(__name__)


def validate_merge(merge: str, recipe_path: Path, meta_dirs: Mapping[str, Path], plan_json: Path,
                   plan_tsv: Path) -> Plan:
    """Validate and plan; the config translation, the prompts' token check (it needs the base's tokenizer;
    the smoke test's prompts are checked in every gate mode), the training texts' check and end_to_end's memory
    against the recipe's budget run too, so their refusals come now. Nothing is written unless every check passes."""
    recipe = load_recipe(recipe_path)
    plan, frame = make_plan(merge, recipe, meta_dirs)
    check_training_memory(plan, str(recipe_path))
    base_config = json.loads((meta_dirs[recipe.base_model] / "config.json").read_text())
    _, decisions = build_config(plan, base_config)
    check_token_inputs(recipe, meta_dirs[recipe.base_model], str(recipe_path))
    plan = plan.with_warnings([d["warning"] for d in decisions if "warning" in d])
    write_plan(plan, frame, plan_json, plan_tsv)
    for warning in plan.warnings:  # on the console and in the validate log, not only in plan.json
        log.warning("%s", warning)
    return plan
