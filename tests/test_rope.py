"""Rope scaling through config translation: preserve exactly, or translate to a theta with the error measured."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeforge.check.smoke_stage import smoke_stage
from moeforge.demo.tiny_models import build_dense_model
from moeforge.errors import RecipeError
from moeforge.plan.translate import angle_error, theta_for
from pipeline import build, plan_only

HEAD_DIM = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("rope")
    tok = tokenizer_dir

    def make(name, scaling):
        return build_dense_model(root / name, "llama", seed=1, tokenizer_dir=tok, rope_scaling=scaling)

    return {
        "linear": make("linear", {"type": "linear", "factor": 4.0}),
        "dynamic": make("dynamic", {"type": "dynamic", "factor": 2.0}),
        "yarn": make("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
        "llama3": make("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    }


def recipe(base, mode):
    return {"base_model": str(base), "gate_mode": "random", "rope_scaling": mode,
            "experts": [{"source_model": str(base)}, {"source_model": str(base)}]}


def translation_of(result):
    return json.loads((result.model_dir.parent / "config" / "translation.json").read_text())


def independent_angle_error(theta, factor, new_theta, head_dim, positions):
    """Plain loops: mean and max over positions and pairs of the wrapped angle difference."""
    total, worst, count = 0.0, 0.0, 0
    for i in range(head_dim // 2):
        f_src = theta ** (-2 * i / head_dim) / factor
        f_new = new_theta ** (-2 * i / head_dim)
        for p in range(positions):
            err = abs(math.remainder(p * (f_src - f_new), 2 * math.pi))
            total, worst, count = total + err, max(worst, err), count + 1
    return total / count, worst


def test_theta_mode_linear(tmp_path, models):
    result = build(tmp_path, recipe(models["linear"], "theta"))
    config = json.loads((result.model_dir / "config.json").read_text())
    expected = 10000.0 * 4.0 ** (HEAD_DIM / (HEAD_DIM - 2))
    assert config["rope_theta"] == pytest.approx(expected, rel=1e-12)
    assert config["rope_scaling"] is None
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": config["rope_theta"]}
    decision = next(d for d in translation_of(result)["decisions"] if d["field"] == "rope_theta")
    mean, worst = independent_angle_error(10000.0, 4.0, expected, HEAD_DIM, 512)
    assert decision["angle_error"]["mean_rad"] == pytest.approx(mean, abs=1e-6)
    assert decision["angle_error"]["max_rad"] == pytest.approx(worst, abs=1e-6)
    assert decision["angle_error"]["positions"] == 512
    assert translation_of(result)["warnings"] and "rotary angle error" in translation_of(result)["warnings"][0]
    assert any("rotary angle error" in w for w in result.plan.warnings)

    out = tmp_path / "smoke"
    report = smoke_stage(result.model_dir, result.model_dir.parent / "plan.json",
                         result.model_dir.parent / "gates.json", result.model_dir.parent / "config/translation.json",
                         result.meta[str(models["linear"])].parent / "weights.json", device="cpu", max_new_tokens=4,
                         out_json=out / "r.json", out_md=out / "r.md", load_png=out / "l.png",
                         similarity_png=out / "s.png", outcome_json=out / "outcome.json")
    assert report["passed"]  # not an identity build: the rope changed on purpose
    deviation = report["comparison"]
    assert json.dumps(deviation) and any("rotary angle error" in w for w in report["warnings"])


def test_angle_error_matches_measured_facts():
    """Head_dim 128, theta 1e4, linear x4, positions 0..4095 (values measured independently)."""
    scaling = {"rope_type": "linear", "factor": 4.0}
    ntk, _ = theta_for(1e4, scaling, 128)
    assert angle_error(1e4, scaling, ntk, 128, 4096)["mean_rad"] == pytest.approx(1.071, abs=1e-3)
    assert angle_error(1e4, scaling, 1e4, 128, 4096)["mean_rad"] == pytest.approx(1.351, abs=1e-3)
    assert angle_error(1e4, scaling, 4e4, 128, 4096)["mean_rad"] == pytest.approx(1.076, abs=1e-3)


def test_dynamic_to_theta_formula(tmp_path, models):
    result = build(tmp_path, recipe(models["dynamic"], "theta"))
    config = json.loads((result.model_dir / "config.json").read_text())
    s, d = 2.0, HEAD_DIM
    assert config["rope_theta"] == pytest.approx(10000.0 * (s * s - s + 1) ** (d / (d - 2)), rel=1e-12)
    assert config["rope_scaling"] is None


@pytest.mark.parametrize("kind", ["yarn", "llama3"])
def test_theta_refused_for_uneven_scalings(tmp_path, models, kind):
    with pytest.raises(RecipeError, match=f"rope scaling '{kind}' has no rope_theta equivalent"):
        plan_only(tmp_path, recipe(models[kind], "theta"))


@pytest.mark.parametrize("kind", ["yarn", "llama3", "dynamic"])
def test_preserve_keeps_every_scaling(tmp_path, models, kind):
    from transformers import AutoModelForCausalLM

    from pipeline import logits

    result = build(tmp_path, recipe(models[kind], "preserve"))
    ids = torch.tensor([[1, 9, 40, 77, 120, 300, 15, 8]])
    dense = AutoModelForCausalLM.from_pretrained(models[kind], dtype=torch.float32).eval()
    with torch.no_grad():
        assert (logits(result.model_dir, ids) - dense(ids).logits).abs().max() < 1e-5


def test_drop_removes_scaling(tmp_path, models):
    result = build(tmp_path, recipe(models["linear"], "drop"))
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["rope_scaling"] is None and config["rope_theta"] == 10000.0
    assert any(d["field"] == "rope_scaling" and "drop" in d["why"] for d in translation_of(result)["decisions"])
    # every expert is the base, yet no identity check can apply: validation says so
    assert any("every expert is the base model, but rope_scaling: drop changes the base's rope" in w
               for w in result.plan.warnings)
