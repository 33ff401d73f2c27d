"""The smoke test catches broken builds and reports routing, on tiny hand-built MoE checkpoints.

Every MoE here is built from a dense base with every expert a copy of the base MLP. Because the
top-k weights sum to 1, such a model equals the base for any router, which gives an exact
reference for the identity check; the faults are then injected into copies of it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import load_file, save_file
from transformers import MixtralConfig, PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig

from moeforge.check.plots import plot_expert_load, plot_gate_similarity
from moeforge.check.report import render_markdown, write_report
from moeforge.check.smoke import SmokeFailure, SmokeOptions, compare_logits, degeneracy_flags, routing_stats, run_smoke
from moeforge.demo.tiny_models import TOKENIZER_FILES, build_dense_model, load_weights, write_weights
from moeforge.errors import BuildError, RecipeError

HIDDEN, INTER, LAYERS, EXPERTS, TOP_K = 32, 64, 2, 4, 2
PROMPTS = ["The quick brown fox", "def add(a, b):", "Two plus two equals"]
EXPERT_NAMES = [f"e{i}" for i in range(EXPERTS)]
EXPERT_PROMPTS = {"e0": ["Slice the onions thinly"], "e2": ["Solve for x in the equation"]}
PINNED = 0  # residual dimension held at 1.0 in every layer, so a router row can steer all tokens
MLP_TO_MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _options(**changes) -> SmokeOptions:
    fields = {"prompts": PROMPTS, "max_new_tokens": 10, "identity": True,
              "expert_prompts": EXPERT_PROMPTS, "expert_names": EXPERT_NAMES}
    return SmokeOptions(**(fields | changes))


def _pin_dimension(model_dir: Path) -> None:
    """Make residual dimension PINNED equal 1 at every position and layer.

    The embedding column is set to 1 and nothing writes to that dimension afterwards (the rows
    of o_proj and down_proj for it are zero), so its sign after each RMSNorm is known.
    """
    tensors = load_weights(model_dir)
    tensors["model.embed_tokens.weight"][:, PINNED] = 1.0
    for name, tensor in tensors.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            tensor[PINNED, :] = 0.0
    write_weights(model_dir, tensors)


def _random_routers(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(EXPERTS, HIDDEN, generator=generator) for _ in range(LAYERS)]


def _steering_routers() -> list[torch.Tensor]:
    """Rows that put expert 0 first and expert 1 second for every token, leaving 2 and 3 unused."""
    router = torch.zeros(EXPERTS, HIDDEN)
    router[:, PINNED] = torch.tensor([50.0, -50.0, -100.0, -150.0])
    return [router.clone() for _ in range(LAYERS)]


def _moe_from(base_dir: Path, out_dir: Path, config: PretrainedConfig, routers: list[torch.Tensor],
              dense_layers: tuple[int, ...] = (), extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an MoE whose experts are all the base MLP, under the Hub names of ``config``'s family.

    Layers in ``dense_layers`` keep the base MLP as it is; ``extra`` adds tensors (shared experts).
    """
    out_dir.mkdir(parents=True)
    mixtral = config.model_type == "mixtral"
    block = "block_sparse_moe" if mixtral else "mlp"
    tensors = dict(extra or {})
    for name, tensor in load_weights(base_dir).items():
        _, _, layer, module, kind, _ = (name.split(".") + [""] * 6)[:6]
        if module != "mlp" or int(layer) in dense_layers:
            tensors[name] = tensor
            continue
        suffix = MLP_TO_MIXTRAL[kind] if mixtral else kind
        for e in range(EXPERTS):
            tensors[f"model.layers.{layer}.{block}.experts.{e}.{suffix}.weight"] = tensor.clone()
    for layer, router in enumerate(routers):
        if layer not in dense_layers:
            tensors[f"model.layers.{layer}.{block}.gate.weight"] = router
    write_weights(out_dir, tensors)
    config.save_pretrained(str(out_dir))
    for name in TOKENIZER_FILES:
        shutil.copyfile(base_dir / name, out_dir / name)
    return out_dir


def _moe_fields(base_dir: Path) -> dict:
    """Config fields shared by the dense base and its MoE (rope, norm eps, sizes, ids)."""
    base = json.loads((base_dir / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    return {k: base[k] for k in keys} | {
        "rope_parameters": {"rope_type": "default", "rope_theta": base["rope_theta"]},
        "num_experts_per_tok": TOP_K,
    }


def _mixtral(base_dir: Path, out_dir: Path, routers: list[torch.Tensor]) -> Path:
    config = MixtralConfig(**_moe_fields(base_dir), intermediate_size=INTER, num_local_experts=EXPERTS,
                           architectures=["MixtralForCausalLM"])
    return _moe_from(base_dir, out_dir, config, routers)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory, tokenizer_dir) -> Path:
    out = build_dense_model(tmp_path_factory.mktemp("llama") / "base", "llama", seed=0, hidden_size=HIDDEN,
                            intermediate_size=INTER, num_layers=LAYERS, tokenizer_dir=tokenizer_dir)
    _pin_dimension(out)
    return out


@pytest.fixture(scope="module")
def identity_build(tmp_path_factory, llama_base) -> Path:
    return _mixtral(llama_base, tmp_path_factory.mktemp("mixtral") / "model", _random_routers(1))


@pytest.fixture(scope="module")
def identity_report(identity_build, llama_base) -> dict:
    return run_smoke(identity_build, llama_base, _options())


@pytest.fixture
def build_copy(identity_build, tmp_path) -> Path:
    return Path(shutil.copytree(identity_build, tmp_path / "model"))


# --------------------------------------------------------------------------- passing builds


def test_identity_build_matches_base(identity_report):
    report = identity_report
    assert report["passed"] and report["errors"] == []
    assert report["comparison"]["max_abs_logit_diff"] < 1e-5
    assert report["comparison"]["top1_agreement"] == 1.0
    assert abs(report["comparison"]["kl_mean"]) < 1e-6
    assert all(row["matches_base"] for row in report["generations"])
    assert report["load"]["missing_keys"] == [] and report["load"]["tensors_scanned"] > 0


def test_report_holds_the_numbers(identity_report):
    report = identity_report
    assert set(report["versions"]) >= {"torch", "transformers"}
    assert report["config"]["model_type"] == "mixtral"
    assert report["config"]["num_local_experts"] == EXPERTS
    for row, prompt in zip(report["generations"], PROMPTS):
        assert row["prompt"] == prompt and isinstance(row["text"], str)
        assert row["degenerate"] == bool(row["flags"])
    assert len(report["comparison"]["prompts"]) == len(PROMPTS)
    routing = report["routing"]
    assert routing["experts"] == EXPERT_NAMES and routing["top_k"] == TOP_K
    assert [row["layer"] for row in routing["layers"]] == list(range(LAYERS))
    for row in routing["layers"]:
        assert math.isclose(sum(row["load_share"]), 1.0, abs_tol=1e-5)
        assert 0 <= row["router_entropy_mean"] <= math.log(EXPERTS) + 1e-9
        assert 0 <= row["load_entropy"] <= math.log(EXPERTS) + 1e-9
        assert set(row["own_top1"]) == set(EXPERT_PROMPTS)


def test_report_is_byte_deterministic(identity_report, identity_build, llama_base, tmp_path):
    write_report(identity_report, tmp_path / "a.json", tmp_path / "a.md")
    write_report(identity_report, tmp_path / "b.json", tmp_path / "b.md")
    again = run_smoke(identity_build, llama_base, _options())
    write_report(again, tmp_path / "c.json", tmp_path / "c.md")
    first = (tmp_path / "a.json").read_bytes()
    assert first == (tmp_path / "b.json").read_bytes() == (tmp_path / "c.json").read_bytes()
    assert (tmp_path / "a.md").read_bytes() == (tmp_path / "c.md").read_bytes()
    assert json.loads(first) == json.loads(json.dumps(identity_report))
    markdown = (tmp_path / "a.md").read_text()
    assert markdown.startswith("# Smoke test: PASS")
    assert all(f"### Prompt {i}" in markdown for i in range(len(PROMPTS)))
    assert all(ch.isprintable() or ch in "\n\t" for ch in markdown)  # generated control bytes escaped


def test_warnings_come_first_in_markdown(identity_report):
    report = identity_report | {"warnings": ["dead expert 'e3'"]}
    markdown = render_markdown(report)
    assert markdown.index("## Warnings") < markdown.index("## Model") < markdown.index("## Generations")


def test_qwen3_moe_identity(tmp_path, tokenizer_dir):
    base = build_dense_model(tmp_path / "base", "qwen3", seed=3, hidden_size=HIDDEN, intermediate_size=INTER,
                             num_layers=LAYERS, head_dim=16, tokenizer_dir=tokenizer_dir)
    fields = _moe_fields(base)
    config = Qwen3MoeConfig(**fields, head_dim=16, moe_intermediate_size=INTER, intermediate_size=INTER,
                            num_experts=EXPERTS, norm_topk_prob=True, architectures=["Qwen3MoeForCausalLM"])
    build = _moe_from(base, tmp_path / "model", config, _random_routers(2))
    report = run_smoke(build, base, _options(max_new_tokens=4))
    assert report["passed"] and report["comparison"]["max_abs_logit_diff"] < 1e-5
    assert report["config"]["model_type"] == "qwen3_moe"


def test_qwen2_moe_identity_with_a_dense_layer(tmp_path, tokenizer_dir):
    """Layer 0 stays dense (mlp_only_layers); the shared expert is silenced by a zero down projection."""
    base = build_dense_model(tmp_path / "base", "qwen2", seed=4, hidden_size=HIDDEN, intermediate_size=INTER,
                             num_layers=LAYERS, tokenizer_dir=tokenizer_dir)
    config = Qwen2MoeConfig(**_moe_fields(base), moe_intermediate_size=INTER, intermediate_size=INTER,
                            shared_expert_intermediate_size=INTER, num_experts=EXPERTS, norm_topk_prob=True,
                            mlp_only_layers=[0], qkv_bias=True, architectures=["Qwen2MoeForCausalLM"])
    shared = "model.layers.1.mlp.shared_expert"
    generator = torch.Generator().manual_seed(5)
    extra = {f"{shared}.gate_proj.weight": torch.randn(INTER, HIDDEN, generator=generator),
             f"{shared}.up_proj.weight": torch.randn(INTER, HIDDEN, generator=generator),
             f"{shared}.down_proj.weight": torch.zeros(HIDDEN, INTER),
             f"{shared}_gate.weight": torch.randn(1, HIDDEN, generator=generator)}
    build = _moe_from(base, tmp_path / "model", config, _random_routers(3), dense_layers=(0,), extra=extra)
    report = run_smoke(build, base, _options(max_new_tokens=4))
    assert report["passed"] and report["comparison"]["max_abs_logit_diff"] < 1e-5
    assert [row["layer"] for row in report["routing"]["layers"]] == [1]


# --------------------------------------------------------------------------- injected faults


def test_missing_attention_weights_fail(build_copy, llama_base):
    path = build_copy / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if ".self_attn." not in k}
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(BuildError, match=r"8 missing keys: model\.layers\.0\.self_attn\."):
        run_smoke(build_copy, llama_base, _options())


def test_mismatched_router_shape_fails(build_copy, llama_base):
    path = build_copy / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.block_sparse_moe.gate.weight"] = torch.zeros(EXPERTS + 1, HIDDEN)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(BuildError, match=r"mismatched keys: model\.layers\.1\..*gate\.weight"):
        run_smoke(build_copy, llama_base, _options())


def test_nan_tensor_fails_naming_it(build_copy, llama_base):
    path = build_copy / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    tensors[name][3, 5] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(BuildError, match=re.escape(f"{name} in model.safetensors (1 values)")):
        run_smoke(build_copy, llama_base, _options())


def test_overflowing_activations_fail(build_copy, llama_base):
    path = build_copy / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"].fill_(3e38)  # finite weights whose products overflow
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(SmokeFailure, match="non-finite logits on prompt 0") as info:
        run_smoke(build_copy, llama_base, _options())
    assert info.value.report["comparison"] is None and info.value.report["routing"] is None
    assert render_markdown(info.value.report).startswith("# Smoke test: FAIL")


def test_corrupted_rope_fails_identity(build_copy, llama_base):
    config_path = build_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_parameters"]["rope_theta"] = 1e6
    config_path.write_text(json.dumps(config))
    with pytest.raises(SmokeFailure, match=r"identity mismatch: max \|Δlogit\| = [0-9.e+-]+ at prompt \d") as info:
        run_smoke(build_copy, llama_base, _options())
    assert isinstance(info.value, BuildError)
    report = info.value.report
    assert not report["passed"] and report["comparison"]["max_abs_logit_diff"] > 1e-4
    assert render_markdown(report).startswith("# Smoke test: FAIL")


def test_same_fault_without_identity_is_a_kl_warning(build_copy, llama_base):
    config_path = build_copy / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_parameters"]["rope_theta"] = 1e6
    config_path.write_text(json.dumps(config))
    report = run_smoke(build_copy, llama_base, _options(identity=False, kl_warn=0.0, max_new_tokens=2))
    assert report["passed"]
    assert any("KL(base || merged)" in w for w in report["warnings"])


def test_dead_experts_are_warnings(tmp_path, llama_base):
    build = _mixtral(llama_base, tmp_path / "model", _steering_routers())
    report = run_smoke(build, llama_base, _options())
    assert report["passed"] and report["comparison"]["max_abs_logit_diff"] < 1e-5
    dead = [w for w in report["warnings"] if w.startswith("dead expert")]
    assert len(dead) == 2
    assert "'e2'" in dead[0] and "'e3'" in dead[1]
    assert "in layer 0: 0.00%, layer 1: 0.00%" in dead[0]
    for row in report["routing"]["layers"]:
        assert row["load_share"] == [0.5, 0.5, 0.0, 0.0]
        assert row["own_top1"] == {"e0": 1.0, "e2": 0.0}
    markdown = render_markdown(report)
    assert markdown.startswith("# Smoke test: PASS with") and "dead expert 'e2'" in markdown


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("tokens", "text", "flags"),
    [
        ([], "", ["empty"]),
        ([2], "", ["immediate_eos", "empty"]),
        ([7, 7, 7, 7, 7], ")))))", ["single_token_repeated"]),
        ([5, 6] * 5, "ab" * 5, ["low_distinct_ratio"]),
        ([5, 6, 7] * 3 + [8], "abc" * 3 + "d", []),
        ([5, 6, 7] * 5, "abc" * 5, ["low_distinct_ratio"]),
        ([9] * 9 + [2], "x" * 9, ["single_token_repeated", "low_distinct_ratio"]),
        (list(range(10, 20)), "a normal sentence", []),
        ([4, 5, 6], "short", []),
    ],
)
def test_degeneracy_flags(tokens, text, flags):
    assert degeneracy_flags(tokens, text, [2]) == flags


def test_compare_logits_numbers():
    base = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    merged = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    result = compare_logits([base], [merged])
    p = torch.softmax(base[1].double(), -1)
    kl = float((p * (torch.log_softmax(base[1].double(), -1) - torch.log_softmax(merged[1].double(), -1))).sum())
    assert result["top1_agreement"] == 0.5
    assert result["max_abs_logit_diff"] == 1.0 and result["prompts"][0]["argmax_position"] == 1
    assert math.isclose(result["kl_mean"], kl / 2, rel_tol=1e-5)


def test_routing_stats_uniform_router():
    logits = [[torch.zeros(5, 3)], [torch.zeros(3, 3)]]
    (row,) = routing_stats(logits, top_k=3, layer_ids=[7], own={"a": (1, [1])})
    assert row["layer"] == 7 and row["load_share"] == [pytest.approx(1 / 3)] * 3
    assert row["router_entropy_mean"] == pytest.approx(math.log(3), rel=1e-5)
    assert row["load_entropy"] == pytest.approx(math.log(3), rel=1e-5)


def test_option_errors(identity_build):
    with pytest.raises(RecipeError, match="at least one prompt"):
        run_smoke(identity_build, None, _options(prompts=[]))
    with pytest.raises(RecipeError, match="needs the base model"):
        run_smoke(identity_build, None, _options())
    with pytest.raises(RecipeError, match="unknown experts"):
        run_smoke(identity_build, None, _options(identity=False, expert_prompts={"nobody": ["x"]}))


# --------------------------------------------------------------------------- plots


def test_plots_are_valid_deterministic_pngs(identity_report, tmp_path):
    plot_expert_load(identity_report, tmp_path / "load.png")
    plot_expert_load(identity_report, tmp_path / "load2.png")
    assert (tmp_path / "load.png").read_bytes() == (tmp_path / "load2.png").read_bytes()
    image = imread(tmp_path / "load.png")
    assert image.ndim == 3 and image.shape[2] == 4 and min(image.shape[:2]) > 50

    routers = _random_routers(1)
    layers = []
    for i, router in enumerate(routers):
        unit = torch.nn.functional.normalize(router, dim=-1)
        layers.append({"layer": i, "cosine": (unit @ unit.T).tolist()})
    gates = {"layers": layers}
    plot_gate_similarity(gates, tmp_path / "gates.png")
    plot_gate_similarity(gates, tmp_path / "gates2.png")
    assert (tmp_path / "gates.png").read_bytes() == (tmp_path / "gates2.png").read_bytes()
    assert imread(tmp_path / "gates.png").shape[2] == 4


def test_plot_without_routing(identity_report, tmp_path):
    plot_expert_load(identity_report | {"routing": None}, tmp_path / "none.png")
    assert imread(tmp_path / "none.png").ndim == 3


@pytest.mark.parametrize(
    "gates",
    [
        {},
        {"layers": []},
        {"layers": [{"layer": 0}]},
        {"layers": [{"layer": 0, "cosine": [[1.0, 0.0]]}]},
        {"layers": [{"layer": "0", "cosine": [[1.0]]}]},
        {"gates": [{"layer": 0, "cosine": [[1.0]]}]},
        {"layers": [{"layer": 0, "cosine": [[1.0]]}, {"layer": 1, "cosine": [[1.0, 0.0], [0.0, 1.0]]}]},
    ],
)
def test_gate_plot_rejects_other_shapes(gates, tmp_path):
    with pytest.raises(BuildError, match="gates.json"):
        plot_gate_similarity(gates, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_a_parting_at_a_near_tie_is_named_as_noise():
    """Continuations that part where a model's two best logits were within numerical noise are a near tie, not a
    difference of the merge; a clear choice that differs stays a difference."""
    from moeforge.check import report as report_module
    from moeforge.check.smoke import near_tie
    from moeforge.runtime.generation import Generation

    merged = Generation([5, 6, 7], "a b c", [(9.0, 1.0), (21.31, 21.3099), (4.0, 1.0)])
    base = Generation([5, 8, 9], "a x y", [(9.0, 1.0), (21.3101, 21.31), (4.0, 1.0)])
    assert near_tie(merged, base) == {"step": 1, "model": "merged", "logits": [21.31, 21.3099]}
    clear = Generation([5, 8, 9], "a x y", [(9.0, 1.0), (25.0, 20.0), (4.0, 1.0)])
    assert near_tie(Generation([5, 6, 7], "a b c", [(9.0, 1.0), (25.0, 20.0), (4.0, 1.0)]), clear) is None
    row = {"prompt": "p", "text": "a b c", "new_tokens": 3, "distinct_tokens": 3, "flags": [], "base_text": "a x y",
           "base_flags": [], "matches_base": False, "near_tie": near_tie(merged, base)}
    text = "\n".join(report_module._md_generations([row], {"generation": "whole"}))
    assert "parts from the merged model at new token 1, where the merged model's two best logits were a near tie " \
           "(21.31 vs 21.3099): within numerical noise" in text


def test_generation_records_the_two_best_logits_of_each_step(tmp_path, base_and_experts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeforge.runtime.generation import generate_all

    model = AutoModelForCausalLM.from_pretrained(str(base_and_experts["base"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(base_and_experts["base"]))
    ids = [torch.tensor([tokenizer("hello world").input_ids]), torch.tensor([tokenizer("a").input_ids])]
    runs = generate_all(model, ids, tokenizer, [], 4, "base")
    for run, prompt in zip(runs, ids):
        assert len(run.top2) == len(run.new_tokens) == 4 and all(a >= b for a, b in run.top2)
        with torch.no_grad():
            first = model(input_ids=prompt).logits[0, -1]
        assert run.new_tokens[0] == int(first.argmax()) and abs(run.top2[0][0] - float(first.max())) < 1e-4
