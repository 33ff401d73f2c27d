"""The validate step: recipe + sources' metadata -> a checked plan, before any weight is read.

The check of the plan against the installed transformers class (which imports torch and
transformers) is its own step, ``check_plan``: the shard jobs wait for it, fetching and gates
do not, so it costs the build no time on the critical path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from moeforge.architectures import output_family_for
from moeforge.classcheck import check_plan_against_class
from moeforge.fileio import write_json
from moeforge.gatespec import validate_spec
from moeforge.plan import make_plan, planned_shapes, write_plan
from moeforge.recipe import load_recipe
from moeforge.stages import gate_spec
from moeforge.translate import build_config


def validate_merge(merge: str, recipe_path: Path, meta_dirs: Mapping[str, Path], plan_json: Path,
                   plan_tsv: Path) -> dict[str, Any]:
    """Validate and plan; the config translation runs too, so its refusals come now."""
    recipe = load_recipe(recipe_path)
    plan, frame = make_plan(merge, recipe, meta_dirs)
    validate_spec(gate_spec(plan))
    base_config = json.loads((meta_dirs[recipe.base_model] / "config.json").read_text())
    _, decisions = build_config(plan, base_config)
    plan["warnings"] += [d["warning"] for d in decisions if "warning" in d]
    write_plan(plan, frame, plan_json, plan_tsv)
    return plan


def check_plan(plan_json: Path, plan_tsv: Path, base_meta: Path, out_json: Path) -> dict[str, Any]:
    """The planned tensors must be exactly what the installed transformers class expects."""
    plan = json.loads(plan_json.read_text())
    frame = pd.read_csv(plan_tsv, sep="\t", dtype=str, keep_default_na=False).astype({"part": int, "concat_dim": int})
    config, _ = build_config(plan, json.loads((base_meta / "config.json").read_text()))
    summary = check_plan_against_class(planned_shapes(frame), config, output_family_for(plan["output_family"]),
                                       plan["num_layers"], plan["num_experts"])
    write_json(out_json, summary)
    return summary
