"""The Qwen family in, Qwen2-MoE and Qwen3-MoE out, with 0..N shared experts and tied embeddings."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moeforge.demo.tiny_models import build_dense_model, build_preset
from moeforge.errors import ModelError, RecipeError
from pipeline import build, logits, plan_only, tensors_of, tf4_logits

IDS = torch.tensor([[1, 17, 45, 98, 203, 7, 88, 150, 33, 61, 240, 12]])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("qwen")
    tok = tokenizer_dir
    return {
        "qwen2": build_preset(root / "qwen2", "qwen2.5", tokenizer_dir=tok),
        "qwen15": build_preset(root / "qwen15", "qwen1.5", tokenizer_dir=tok),
        "qwen2tied": build_preset(root / "qwen2tied", "qwen2-0.5b", tokenizer_dir=tok),
        "qwen3": build_preset(root / "qwen3", "qwen3", tokenizer_dir=tok),
        "llama_hd": build_dense_model(root / "llama_hd", "llama", seed=3, head_dim=32, tokenizer_dir=tok),
        "wide": build_preset(root / "wide", "qwen2.5", seed=9, intermediate_size=96, tokenizer_dir=tok),
    }


def dense_logits(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def recipe(base, experts, shared=(), **extra):
    return {"base_model": str(base), "gate_mode": "random", "experts_per_token": 2,
            "experts": [{"source_model": str(e), **o} for e, o in experts],
            **({"shared_experts": [{"source_model": str(e), **o} for e, o in shared]} if shared else {}), **extra}


def max_diff(model_dir, base):
    return (logits(model_dir, IDS) - dense_logits(base)).abs().max().item()


def test_qwen2_to_qwen2_moe_zero_shared_is_identity(tmp_path, zoo):
    """No shared experts: an all-zero shared expert contributes exactly nothing."""
    q = zoo["qwen2"]
    result = build(tmp_path, recipe(q, [(q, {})] * 3))
    assert result.plan.output_family == "qwen2_moe"
    assert max_diff(result.model_dir, q) < 1e-5
    tensors = tensors_of(result.model_dir)
    assert not tensors["model.layers.0.mlp.shared_expert.down_proj.weight"].any()
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["num_experts"] == 3 and config["shared_expert_intermediate_size"] == 128
    assert config["decoder_sparse_step"] == 1 and config["mlp_only_layers"] == []


def test_one_shared_expert_always_is_identity(tmp_path, zoo):
    """Routed experts = base MLP x 0.5 and one shared expert = base MLP x 0.5 under shared_gate: always.

    The routed mixture gives 0.5*mlp(x) (weights sum to 1); the shared expert's gate weight is 0,
    sigmoid(0) = 0.5, and its down projection is doubled, so it adds 0.5*2*0.5*mlp(x) = 0.5*mlp(x).
    The sum is the base model.
    """
    q = zoo["qwen2"]
    half = {"residual_scale": 0.5}
    result = build(tmp_path, recipe(q, [(q, half)] * 2, shared=[(q, half)], shared_gate="always"))
    assert max_diff(result.model_dir, q) < 1e-5


def test_n_shared_experts_fuse_to_their_sum(tmp_path, zoo):
    """Two shared experts become one MLP of twice the width that computes their sum."""
    q, wide = zoo["qwen2"], zoo["wide"]
    result = build(tmp_path, recipe(q, [(q, {})] * 2, shared=[(q, {}), (wide, {"residual_scale": 0.3})],
                                    shared_gate="always"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.model_dir, dtype=torch.float32).eval()
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 128 + 96
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))

    def mlp(src, layer, scale=1.0):
        w = tensors_of(src)
        p = f"model.layers.{layer}.mlp."
        h = F.silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)
        return scale * h @ w[p + "down_proj.weight"].T

    for layer in range(2):
        with torch.no_grad():
            shared = model.model.layers[layer].mlp.shared_expert(x) * torch.sigmoid(torch.zeros(()))
        expected = mlp(q, layer) + mlp(wide, layer, 0.3)
        assert torch.allclose(shared, expected, atol=1e-5), (shared - expected).abs().max()


def test_two_shared_experts_identity(tmp_path, zoo):
    q = zoo["qwen2"]
    result = build(tmp_path, recipe(q, [(q, {"residual_scale": 0.5})] * 2,
                                    shared=[(q, {"residual_scale": 0.25})] * 2, shared_gate="always"))
    assert max_diff(result.model_dir, q) < 1e-5


def test_shared_gate_from_prompts(tmp_path, zoo):
    q = zoo["qwen2"]
    prompts = {"positive_prompts": ["def main():", "import os"]}
    result = build(tmp_path, recipe(q, [(q, prompts), (q, {"positive_prompts": ["bake the bread"]})],
                                    shared=[(q, {"positive_prompts": ["hello there"]})], gate_mode="hidden"))
    from safetensors import safe_open

    tensors = tensors_of(result.model_dir)
    with safe_open(str(result.model_dir.parent / "gates.safetensors"), framework="pt") as fh:
        gate = fh.get_tensor("layer.1.shared_expert_gate")
    assert gate.shape == (1, 64) and gate.abs().sum() > 0
    assert torch.equal(tensors["model.layers.1.mlp.shared_expert_gate.weight"], gate)


def test_cheap_embed_shared_gate_in_a_float32_merge(tmp_path, zoo):
    """cheap_embed gives every layer the same vectors: in a float32 output they were one tensor shared by every
    layer, which safetensors refused to write (the gates job failed as a moeforge bug)."""
    q = zoo["qwen2"]
    result = build(tmp_path, recipe(q, [(q, {"positive_prompts": ["def main():"]}),
                                        (q, {"positive_prompts": ["bake the bread"]})],
                                    shared=[(q, {"positive_prompts": ["hello there"]})], gate_mode="cheap_embed",
                                    dtype="float32"))
    tensors = tensors_of(result.model_dir)
    gates = [tensors[f"model.layers.{i}.mlp.shared_expert_gate.weight"] for i in range(2)]
    assert gates[0].abs().sum() > 0 and torch.equal(gates[0], gates[1])


def test_qwen3_to_qwen3_moe_identity(tmp_path, zoo):
    q = zoo["qwen3"]
    result = build(tmp_path, recipe(q, [(q, {})] * 3))
    assert result.plan.output_family == "qwen3_moe"
    assert max_diff(result.model_dir, q) < 1e-5
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["num_experts"] == config["num_local_experts"] == 3
    assert "model.layers.0.self_attn.q_norm.weight" in tensors_of(result.model_dir)


def test_llama_to_qwen2_moe_zero_biases(tmp_path, zoo):
    """A Llama base has no q/k/v biases: they are written as zeros sized heads x head_dim."""
    base = zoo["llama_hd"]
    result = build(tmp_path, recipe(base, [(base, {})] * 2, architecture="qwen"))
    tensors = tensors_of(result.model_dir)
    assert tensors["model.layers.0.self_attn.q_proj.bias"].shape == (4 * 32,)
    assert tensors["model.layers.0.self_attn.k_proj.bias"].shape == (2 * 32,)
    assert not tensors["model.layers.0.self_attn.q_proj.bias"].any()
    assert max_diff(result.model_dir, base) < 1e-5


@pytest.mark.parametrize("architecture", ["qwen", "Qwen", "QWEN3", "Qwen3 MoE", "q"])
def test_architecture_is_read_as_mergekit_moe_reads_it(tmp_path, zoo, architecture):
    """A case-insensitive prefix of an output name: `qwen` on a Qwen3 base is Qwen3-MoE, as in mergekit-moe."""
    q = zoo["qwen3"]
    assert plan_only(tmp_path, recipe(q, [(q, {})] * 2, architecture=architecture)).output_family == "qwen3_moe"


def test_llama_cannot_become_qwen3_moe(tmp_path, zoo):
    base = zoo["llama_hd"]
    with pytest.raises(ModelError, match="qwen3_moe needs self_attn.q_norm.weight"):
        plan_only(tmp_path, recipe(base, [(base, {})] * 2, architecture="qwen3"))


def test_shared_experts_need_qwen2_moe(tmp_path, zoo):
    q = zoo["qwen3"]
    with pytest.raises(RecipeError, match="qwen3_moe has no shared experts"):
        plan_only(tmp_path, recipe(q, [(q, {})] * 2, shared=[(q, {})]))


def test_qwen15_builds_loads_and_generates(tmp_path, zoo):
    """Report 4: Qwen1.5 (model_type qwen2) is accepted and becomes a working Qwen2-MoE."""
    q = zoo["qwen15"]
    result = build(tmp_path, recipe(q, [(q, {})] * 2))
    assert max_diff(result.model_dir, q) < 1e-5
    generate(result.model_dir)


def generate(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok("The cook", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def test_qwen2_tied_keeps_tie_and_untie_matches(tmp_path, zoo):
    """Report 5: Qwen2-0.5B-style (tied, no lm_head.weight on disk) builds without KeyError."""
    q = zoo["qwen2tied"]
    kept = build(tmp_path / "keep", recipe(q, [(q, {})] * 2))
    assert "lm_head.weight" not in tensors_of(kept.model_dir)
    assert json.loads((kept.model_dir / "config.json").read_text())["tie_word_embeddings"] is True
    assert max_diff(kept.model_dir, q) < 1e-5
    generate(kept.model_dir)
    untied = build(tmp_path / "untie", recipe(q, [(q, {})] * 2, tie_word_embeddings="untie"))
    assert json.loads((untied.model_dir / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in tensors_of(untied.model_dir)
    assert max_diff(untied.model_dir, q) < 1e-5


@pytest.mark.parametrize("key", ["qwen2", "qwen3"])
def test_transformers4_loads_qwen_moe(tmp_path, zoo, key, tf4_python):
    q = zoo[key]
    result = build(tmp_path, recipe(q, [(q, {})] * 2))
    assert (tf4_logits(tf4_python, result.model_dir, IDS) - dense_logits(q)).abs().max().item() < 1e-5


@pytest.mark.parametrize("key", ["qwen2", "qwen3"])
def test_smoke_stage_passes_on_qwen_outputs(tmp_path, zoo, key):
    """The pipeline's smoke stage on Qwen2-MoE / Qwen3-MoE identity builds: passes, with the numbers."""
    from moeforge.check.smoke_stage import smoke_stage

    q = zoo[key]
    prompts = {"positive_prompts": ["def main():", "The oven is hot"]}
    result = build(tmp_path, recipe(q, [(q, prompts), (q, {"positive_prompts": ["Solve for x"]})],
                                    gate_mode="router_input"))
    out = tmp_path / "smoke"
    weights = result.meta[str(q)].parent / "weights.json"
    report = smoke_stage(result.model_dir, result.model_dir.parent / "plan.json",
                         result.model_dir.parent / "gates.json", result.model_dir.parent / "config/translation.json",
                         weights, device="cpu", max_new_tokens=4, out_json=out / "r.json", out_md=out / "r.md",
                         load_png=out / "l.png", similarity_png=out / "s.png", outcome_json=out / "outcome.json")
    assert report["passed"] and report["options"]["identity"] is True
    assert report["comparison"]["max_abs_logit_diff"] < 1e-4
    layers = report["routing"]["layers"]
    assert len(layers) == result.plan.num_layers
    assert all(abs(sum(layer["load_share"]) - 1) < 1e-4 for layer in layers)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, tokenizer_dir):
    """Bases with a sliding window shorter than IDS: in every layer, and from layer 1 on (Qwen's max_window_layers)."""
    root = tmp_path_factory.mktemp("windowed")
    return {
        "qwen2_all": build_dense_model(root / "qwen2_all", "qwen2", seed=4, sliding_window=4, tokenizer_dir=tokenizer_dir),
        "qwen2_late": build_dense_model(root / "qwen2_late", "qwen2", seed=5, sliding_window=4,
                                        config_overrides={"max_window_layers": 1}, tokenizer_dir=tokenizer_dir),
        "mistral": build_dense_model(root / "mistral", "mistral", seed=6, sliding_window=4, tokenizer_dir=tokenizer_dir),
    }


def test_qwen2_moe_keeps_the_bases_window_in_every_layer(tmp_path, windowed, tf4_python):
    """The window in every layer, in transformers 5.x (layer_types) and 4.x (max_window_layers 0):
    5.x's Qwen2-MoE would otherwise derive an alternating pattern from max_window_layers."""
    q = windowed["qwen2_all"]
    result = build(tmp_path, recipe(q, [(q, {})] * 2, sliding_window=4))
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["max_window_layers"] == 0 and config["use_sliding_window"] is True
    assert config["layer_types"] == ["sliding_attention"] * config["num_hidden_layers"]
    assert not result.plan.warnings
    assert max_diff(result.model_dir, q) < 1e-5  # IDS is 12 tokens, the window 4: every layer's mask matters
    assert (tf4_logits(tf4_python, result.model_dir, IDS) - dense_logits(q)).abs().max().item() < 1e-5


def test_window_from_a_later_layer_is_refused(tmp_path, windowed):
    """transformers 4.x masks every layer of an MoE with the window, so no output reproduces a base whose
    window starts at layer 1; full attention (the default) builds, with a warning."""
    q = windowed["qwen2_late"]
    with pytest.raises(RecipeError, match=r"layers 1-\d \(of 0-\d\) only.*qwen2_moe.*every layer") as info:
        plan_only(tmp_path, recipe(q, [(q, {})] * 2, sliding_window=4))
    assert info.value.where == "recipe: sliding_window"
    plan = plan_only(tmp_path / "full", recipe(q, [(q, {})] * 2))
    assert any("set sliding_window: 4" in w for w in plan.warnings)


def test_a_dropped_window_is_warned_at_validation_and_not_an_identity_build(tmp_path, windowed):
    """The default sliding_window: null gives full attention; the merge then differs from its windowed base on
    long inputs, so validation says so and the smoke test does not demand identity."""
    from moeforge.plan.identity import is_identity_build

    m = windowed["mistral"]
    plan = plan_only(tmp_path / "null", recipe(m, [(m, {})] * 2))
    assert any("sliding window of 4 tokens" in w and "set sliding_window: 4" in w for w in plan.warnings)
    assert not is_identity_build(plan) and plan.window_layers == ()
    assert any("every expert is the base model, but the output's sliding window differs" in w for w in plan.warnings)
    kept = plan_only(tmp_path / "kept", recipe(m, [(m, {})] * 2, sliding_window=4))
    assert not kept.warnings and is_identity_build(kept)
    assert kept.window_layers == tuple(range(kept.num_layers))
