"""The validate step: recipe + sources' metadata -> a checked plan, before any weight is read.

The check of the plan against the installed transformers class (which imports torch and
transformers) is not made here: the gates job, which imports them anyway, makes it first, and
assembly waits for it; validation stays fast on the critical path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from moeforge.build.translate import build_config
from moeforge.errors import ModelError
from moeforge.gates.spec import PROMPTLESS_MODES, check_prompt_tokens, gate_spec, validate_spec
from moeforge.io.hf_load import load_tokenizer
from moeforge.plan.make import make_plan, write_plan
from moeforge.plan.recipe import load_recipe


def validate_merge(merge: str, recipe_path: Path, meta_dirs: Mapping[str, Path], plan_json: Path,
                   plan_tsv: Path) -> dict[str, Any]:
    """Validate and plan; the config translation runs too, so its refusals come now."""
    recipe = load_recipe(recipe_path)
    plan, frame = make_plan(merge, recipe, meta_dirs)
    spec = gate_spec(plan)
    validate_spec(spec)
    if spec.mode not in PROMPTLESS_MODES:
        tokenizer = load_tokenizer(meta_dirs[recipe.base_model], ModelError, "the base model's tokenizer",
                                   "the gates read the prompts with it: check the base's tokenizer files", generic=True)
        check_prompt_tokens(spec, tokenizer, plan["base_params"].get("max_position_embeddings"))
    base_config = json.loads((meta_dirs[recipe.base_model] / "config.json").read_text())
    _, decisions = build_config(plan, base_config)
    plan["warnings"] += [d["warning"] for d in decisions if "warning" in d]
    write_plan(plan, frame, plan_json, plan_tsv)
    return plan


