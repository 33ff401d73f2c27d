"""plan.json: the Plan written by validation, checked against schemas/plan.schema.yaml on write and on read."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from moeforge.errors import BuildError
from moeforge.io.schema import package_schema, schema_errors
from moeforge.plan.plan_json import read_plan, write_plan_json
from moeforge.plan.recipe import Recipe
from moeforge.plan.translate import translate
from pipeline import plan_only


@pytest.fixture(scope="module")
def planned(tmp_path_factory, base_and_experts) -> tuple[Path, object]:
    """A Qwen2-MoE plan with prompts, noise, a shared expert and smoke prompts: most of the plan's fields set."""
    models = base_and_experts
    root = tmp_path_factory.mktemp("plan")
    recipe = {"base_model": str(models["base"]), "architecture": "qwen", "gate_mode": "hidden", "dtype": "bf16",
              "experts": [{"source_model": str(models["e0"]), "positive_prompts": ["def f(x):"],
                           "negative_prompts": ["bake the bread"], "noise_scale": 0.01},
                          {"source_model": str(models["e1"]), "positive_prompts": ["bake the bread"],
                           "residual_scale": 0.5}],
              "shared_experts": [{"source_model": str(models["e0"]), "positive_prompts": ["hello"]}],
              "smoke_prompts": ["Once upon a time"], "seed": 3}
    plan = plan_only(root, recipe)
    return root / "results" / "m" / "plan.json", plan


def test_the_written_plan_matches_its_schema_and_reads_back_equal(planned):
    path, plan = planned
    document = json.loads(path.read_text())
    assert schema_errors(document, package_schema("plan")) == []
    again = read_plan(path)
    assert again == plan
    assert isinstance(again.recipe, Recipe) and again.recipe.experts[0].noise_scale == 0.01
    assert again.recipe.shared_experts[0].positive_prompts == ("hello",) and again.recipe.dtype == "bfloat16"
    assert again.shared_intermediate_size is not None and again.dtype_out == "BF16"
    assert [e.name for e in again.experts] == [e.name for e in again.recipe.experts]
    assert {s.roles for s in again.sources.values()} >= {("base",)}
    # the same bytes when written again: the field order and forms are the file's
    assert json.dumps(again.to_dict(), indent=2, ensure_ascii=False) + "\n" == path.read_text()


def tampered(path: Path, tmp_path: Path, change) -> Path:
    document = json.loads(path.read_text())
    change(document)
    out = tmp_path / "results" / "m" / "plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document))
    return out


@pytest.mark.parametrize(("change", "names"), [
    (lambda d: d.pop("window_layers"), "'window_layers' is a required property"),  # a plan older than the key
    (lambda d: d["recipe"].pop("shared_gate"), "recipe: 'shared_gate' is a required property"),
    (lambda d: d.update(layer_bytes="big"), "layer_bytes: 'big' is not of type 'integer'"),
    (lambda d: d["recipe"]["experts"][0].update(positive_prompts="def f(x):"), "recipe.experts[0].positive_prompts"),
    (lambda d: d.update(stage="old"), "unknown key 'stage'"),
])
def test_a_plan_that_fails_the_schema_is_refused_naming_the_file(planned, tmp_path, change, names):
    path = tampered(planned[0], tmp_path, change)
    with pytest.raises(BuildError) as info:
        read_plan(path)
    assert info.value.where == str(path) and names in info.value.what
    assert "rerun" in info.value.fix and "delete it" in info.value.fix
    # the jobs read it the same way: the config translation refuses it before writing anything
    with pytest.raises(BuildError, match="not a plan this moeforge can execute"):
        translate(path, tmp_path / "unused", tmp_path / "config")
    assert not (tmp_path / "config").exists()


def test_a_truncated_plan_is_refused_naming_the_file(planned, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(planned[0].read_text()[:100])
    with pytest.raises(BuildError, match="not valid JSON") as info:
        read_plan(path)
    assert info.value.where == str(path)


def test_a_plan_that_fails_the_schema_is_not_written(planned, tmp_path):
    bad = replace(planned[1], num_experts=0)
    with pytest.raises(BuildError, match="num_experts: 0 is less than the minimum of 1"):
        write_plan_json(bad, tmp_path / "plan.json")
    assert not (tmp_path / "plan.json").exists()
