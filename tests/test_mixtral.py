"""Llama/Mistral -> Mixtral: complete, correct and reproducible outputs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from moeforge.demo.tiny_models import build_dense_model
from pipeline import build, lock_of, logits, sha256_tree, tensors_of, tf4_logits

IDS = torch.tensor([[1, 17, 45, 98, 203, 7, 88, 150, 33, 61, 240, 12]])


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """A Llama base, a rope-scaled (linear x4) Llama, a Mistral, and three experts of the base."""
    root = tmp_path_factory.mktemp("models")
    tok = tokenizer_dir
    out = {
        "base": build_dense_model(root / "base", "llama", seed=0, tokenizer_dir=tok),
        "scaled": build_dense_model(root / "scaled", "llama", seed=5, tokenizer_dir=tok,
                                    rope_scaling={"type": "linear", "factor": 4.0}),
        "mistral": build_dense_model(root / "mistral", "mistral", seed=6, tokenizer_dir=tok, sliding_window=128),
        "tied": build_dense_model(root / "tied", "llama", seed=7, tokenizer_dir=tok, tie_word_embeddings=True),
    }
    for i in range(3):
        out[f"e{i}"] = build_dense_model(root / f"e{i}", derive_from=out["base"], seed=10 + i, mlp_noise=0.05)
    return out


def recipe_for(base, expert_dirs, **extra):
    return {"base_model": str(base), "gate_mode": "random", "experts_per_token": 2,
            "experts": [{"source_model": str(e)} for e in expert_dirs], **extra}


def dense_logits(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("base_key", ["base", "scaled", "tied"])
def test_identity_build_equals_dense_base(tmp_path, models, base_key):
    """Every expert = the base: the MoE output is a convex mix of identical MLPs = the base.

    With linear rope x4 this is the ")))))" report: the scaling must survive translation.
    """
    base = models[base_key]
    result = build(tmp_path, recipe_for(base, [base] * 3))
    diff = (logits(result.model_dir, IDS) - dense_logits(base)).abs().max().item()
    assert diff < 1e-5, f"max |dlogit| = {diff}"


def test_rope_scaling_written_in_both_forms(tmp_path, models):
    result = build(tmp_path, recipe_for(models["scaled"], [models["scaled"]] * 2))
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["rope_scaling"]["factor"] == 4.0 and config["rope_scaling"]["type"] == "linear"
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    assert config["rope_theta"] == 10000.0


def test_experts_are_their_sources_bit_for_bit(tmp_path, models):
    experts = [models["e0"], models["e1"], models["e2"]]
    result = build(tmp_path, recipe_for(models["base"], experts))
    out = tensors_of(result.model_dir)
    num_layers = result.plan.num_layers
    for e, src_dir in enumerate(experts):
        src = tensors_of(src_dir)
        for layer in range(num_layers):
            for w, role in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                got = out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]
                want = src[f"model.layers.{layer}.mlp.{role}.weight"]
                assert torch.equal(got, want)
    base = tensors_of(models["base"])
    for name, tensor in base.items():
        if ".mlp." not in name:  # attention, norms, embeddings: from the base (report 1)
            assert torch.equal(out[name], tensor), name
    with safe_open(str(result.model_dir.parent / "gates.safetensors"), framework="pt") as fh:
        for layer in range(num_layers):
            assert torch.equal(out[f"model.layers.{layer}.block_sparse_moe.gate.weight"],
                               fh.get_tensor(f"layer.{layer}.router"))


def test_classic_names_and_nothing_missing(tmp_path, models):
    """Attention and norms present in every layer (report 1); no fused 5.x names on disk."""
    result = build(tmp_path, recipe_for(models["base"], [models["e0"], models["e1"]]))
    names = set(tensors_of(result.model_dir))
    for layer in range(result.plan.num_layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "input_layernorm", "post_attention_layernorm", "block_sparse_moe.gate"):
            assert f"model.layers.{layer}.{part}.weight" in names
    assert not any("gate_up_proj" in n or ".mlp." in n for n in names)
    index = json.loads((result.model_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == names
    sizes = sum(t.numel() * t.element_size() for t in tensors_of(result.model_dir).values())
    assert index["metadata"]["total_size"] == sizes
    logits(result.model_dir, IDS)  # strict load


def test_mistral_to_mixtral(tmp_path, models):
    mistral = models["mistral"]
    result = build(tmp_path, recipe_for(mistral, [mistral] * 3))
    diff = (logits(result.model_dir, IDS) - dense_logits(mistral)).abs().max().item()
    assert diff < 1e-5
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["sliding_window"] is None  # null unless the recipe says otherwise
    translation = json.loads((result.model_dir.parent / "config" / "translation.json").read_text())
    assert any(d["field"] == "sliding_window" and "128" in d["why"] for d in translation["decisions"])


def test_two_builds_are_byte_identical(tmp_path, models):
    recipe = recipe_for(models["base"], [models["e0"], models["e1"], models["e2"]], dtype="bfloat16",
                        experts=[{"source_model": str(models["e0"]), "noise_scale": 0.01},
                                 {"source_model": str(models["e1"]), "residual_scale": 0.5},
                                 {"source_model": str(models["e2"])}])
    first = build(tmp_path / "a", recipe)
    second = build(tmp_path / "b", recipe)
    hashes = sha256_tree(first.model_dir)
    assert hashes == sha256_tree(second.model_dir)
    lock = lock_of(first.model_dir)
    assert {k: v for k, v in hashes.items() if k != "moeforge.lock.json"} == lock["files"]
    assert lock["sources"] and all(f["sha256"] for s in lock["sources"].values() for f in s["files"])


def test_noise_and_residual_scale(tmp_path, models):
    recipe = recipe_for(models["base"], [models["e0"], models["e1"]], seed=3,
                        experts=[{"source_model": str(models["e0"]), "noise_scale": 0.01},
                                 {"source_model": str(models["e1"]), "residual_scale": 0.5}])
    out = tensors_of(build(tmp_path, recipe).model_dir)
    src0, src1 = tensors_of(models["e0"]), tensors_of(models["e1"])
    noisy = out["model.layers.0.block_sparse_moe.experts.0.w1.weight"] - src0["model.layers.0.mlp.gate_proj.weight"]
    assert 0.005 < noisy.std().item() < 0.02
    assert torch.allclose(out["model.layers.0.block_sparse_moe.experts.1.w2.weight"],
                          src1["model.layers.0.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(out["model.layers.0.block_sparse_moe.experts.1.w1.weight"],
                       src1["model.layers.0.mlp.gate_proj.weight"])


def test_tied_base_keeps_tie(tmp_path, models):
    """Report 5's class: a tied base has no lm_head on disk; the output stays tied."""
    tied = models["tied"]
    result = build(tmp_path, recipe_for(tied, [tied, tied]))
    assert "lm_head.weight" not in tensors_of(result.model_dir)
    assert json.loads((result.model_dir / "config.json").read_text())["tie_word_embeddings"] is True
    untied = build(tmp_path / "untie", recipe_for(tied, [tied, tied], tie_word_embeddings="untie"))
    tensors = tensors_of(untied.model_dir)
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert torch.allclose(logits(untied.model_dir, IDS), dense_logits(tied), atol=1e-5)


def test_dtype_cast(tmp_path, models):
    result = build(tmp_path, recipe_for(models["base"], [models["e0"], models["e1"]], dtype="bfloat16"))
    out = tensors_of(result.model_dir)
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    src = tensors_of(models["e1"])["model.layers.2.mlp.up_proj.weight"]
    assert torch.equal(out["model.layers.2.block_sparse_moe.experts.1.w3.weight"], src.to(torch.bfloat16))
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"


def test_model_card_and_tokenizer_bytes(tmp_path, models):
    result = build(tmp_path, recipe_for(models["base"], [models["e0"], models["e1"]]))
    card = (result.model_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in front, "local sources are not Hub ids"  # they are named in the text
    assert front["tags"] == ["moe", "merge", "moeforge"] and front["library_name"] == "transformers"
    assert f"`{models['base'].name}`" in card and str(models["base"]) not in card
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (result.model_dir / name).read_bytes() == (models["base"] / name).read_bytes()


def test_transformers4_loads_with_same_logits(tmp_path, models, tf4_python):
    """The same output loads strictly in transformers 4.57 with the same logits (rope-scaled base)."""
    scaled = models["scaled"]
    result = build(tmp_path, recipe_for(scaled, [scaled] * 3))
    diff = (tf4_logits(tf4_python, result.model_dir, IDS) - dense_logits(scaled)).abs().max().item()
    assert diff < 1e-5, f"transformers 4.x max |dlogit| = {diff}"


def test_identity_check_in_bfloat16(tmp_path, models):
    """A bfloat16 build of a float32 base, generating in bfloat16: the identity check holds within the
    rounding of the stored weights, and still catches a wrong rope theta."""
    from moeforge.check.smoke import SmokeOptions, run_smoke
    from moeforge.errors import BuildError

    base = models["base"]
    result = build(tmp_path, recipe_for(base, [base] * 3, dtype="bfloat16"))
    opts = SmokeOptions(prompts=["The cook adds salt", "def main():"], max_new_tokens=4, identity=True,
                        dtype="bfloat16")
    report = run_smoke(result.model_dir, base, opts)
    assert report["passed"] and report["comparison"]["top1_agreement"] > 0.9
    config_path = result.model_dir / "config.json"
    config_path.chmod(0o644)
    config = json.loads(config_path.read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"] = 1e6
    config_path.write_text(json.dumps(config))
    with pytest.raises(BuildError, match="identity mismatch.*stored in bfloat16, the base.s in float32"):
        run_smoke(result.model_dir, base, opts)


def test_class_check_refuses_a_plan_without_attention(tmp_path, models):
    """Report 1's class, caught before any weight is written: a plan missing attention or norm
    tensors does not match the installed transformers Mixtral class."""
    from moeforge.errors import BuildError
    from moeforge.plan.class_check import check_plan_against_class
    from moeforge.plan.table import planned_shapes, read_rows
    from moeforge.plan.templates import output_family_for
    from moeforge.plan.translate import build_config
    from pipeline import plan_only

    plan = plan_only(tmp_path, recipe_for(models["base"], [models["e0"], models["e1"]]))
    config, _ = build_config(plan, json.loads((models["base"] / "config.json").read_text()))
    out = output_family_for("mixtral")
    planned = planned_shapes(read_rows(tmp_path / "results/m/plan.tensors.tsv"))
    summary = check_plan_against_class(planned, config, out, plan.num_layers, plan.num_experts)
    assert summary["tensors"] == 3 + 9 * plan.num_layers  # fused in 5.x: router, gate_up, down per layer
    assert "fused" in summary["layout_compared"]
    crippled = {k: v for k, v in planned.items() if "self_attn" not in k and "layernorm" not in k}
    with pytest.raises(BuildError, match=r"tensor\(s\) the class needs are not planned: .*self_attn"):
        check_plan_against_class(crippled, config, out, plan.num_layers, plan.num_experts)
    wrong = dict(planned, **{"model.layers.0.block_sparse_moe.gate.weight": (3, 64)})
    with pytest.raises(BuildError, match="shape mismatch"):
        check_plan_against_class(wrong, config, out, plan.num_layers, plan.num_experts)
