"""The validate step: recipe + sources' metadata -> a checked plan, before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from moeforge.architectures import output_family_for
from moeforge.classcheck import check_plan_against_class
from moeforge.plan import make_plan, planned_shapes, write_plan
from moeforge.gates import validate_spec
from moeforge.recipe import load_recipe
from moeforge.stages import gate_spec
from moeforge.translate import build_config


def validate_merge(merge: str, recipe_path: Path, meta_dirs: Mapping[str, Path], plan_json: Path,
                   plan_tsv: Path) -> dict[str, Any]:
    """Validate, plan, and check the plan against the installed transformers class."""
    recipe = load_recipe(recipe_path)
    plan, frame = make_plan(merge, recipe, meta_dirs)
    validate_spec(gate_spec(plan))
    base_config = json.loads((meta_dirs[recipe.base_model] / "config.json").read_text())
    config, decisions = build_config(plan, base_config)
    plan["warnings"] += [d["warning"] for d in decisions if "warning" in d]
    planned = planned_shapes(frame)
    plan["class_check"] = check_plan_against_class(planned, config, output_family_for(plan["output_family"]),
                                                   plan["num_layers"], plan["num_experts"])
    write_plan(plan, frame, plan_json, plan_tsv)
    return plan
