"""Gate computation: the layer-streamed forward, every gate mode, and the written files.

Reference values are computed the plain way: the full transformers model, one prompt at a time,
no padding, ``output_hidden_states`` or hooks on ``post_attention_layernorm``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeforge.demo.tiny_models import build_dense_model
from moeforge.errors import ModelError, RecipeError
from moeforge.gates.compute import compute_gates, write_gates
from moeforge.plan.recipe import GATE_MODES, ExpertSpec, Recipe, parse_recipe
from moeforge.runtime import layerwise
from moeforge.runtime.layerwise import PackedSequences, iter_layer_hidden_states, position_ids_for, stream_sequences

TOPICS = {
    "code": (
        "def add(a, b): return a + b",
        "for word in text.split(): counts[word] += 1",
        "import numpy as np",
        "class Parser: def parse(self, line):",
        "raise ValueError('empty list')",
    ),
    "math": (
        "the integral of x squared is x cubed over three",
        "a prime number has exactly two divisors",
        "the sum of the angles of a triangle is 180 degrees",
        "solve the equation 2x + 3 = 7",
        "the derivative of sine is cosine",
    ),
    "cooking": (
        "whisk the eggs with sugar and butter",
        "bake the bread in a hot oven for forty minutes",
        "chop the onions and fry them in olive oil",
        "add a pinch of salt to the boiling water",
        "simmer the soup with garlic and pepper",
    ),
}


def named_expert(name: str, positive: tuple[str, ...] = (), negative: tuple[str, ...] = ()) -> ExpertSpec:
    """A recipe expert with these prompts (the gates read only the base model: its source is not used)."""
    return ExpertSpec(source_model=f"org/{name}", name=name, positive_prompts=positive, negative_prompts=negative)


def gate_recipe(mode: str, experts: tuple[ExpertSpec, ...], **settings) -> Recipe:
    """A recipe with these experts and gate settings, the other keys at their defaults."""
    return Recipe(base_model="org/base", experts=experts, gate_mode=mode, **settings)


TOPIC_EXPERTS = tuple(named_expert(name, prompts) for name, prompts in TOPICS.items())

# Prompts of different lengths, with negatives, so padding and subtraction both matter.
SMALL_EXPERTS = (
    named_expert("a", ("def mean(values):", "a list keeps items in order and allows duplicates"), ("salt",)),
    named_expert("b", ("the oven is hot", "bread"), ("def f(x): return x", "import os")),
    named_expert("c", ("a triangle has three sides",)),
)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Tiny checkpoints covering the supported families' differences."""
    root = tmp_path_factory.mktemp("models")
    common = {"tokenizer_dir": tokenizer_dir, "num_layers": 3, "hidden_size": 32, "intermediate_size": 64}
    return {
        "llama": build_dense_model(root / "llama", "llama", seed=0, **common),
        # a window shorter than the prompts, so the sliding mask changes the result
        "mistral": build_dense_model(root / "mistral", "mistral", seed=1, sliding_window=4, **common),
        # q/k/v biases; sharded bf16 weights; layer 0 full attention, layers 1-2 sliding window
        "qwen2": build_dense_model(
            root / "qwen2", "qwen2", seed=2, dtype="bfloat16", max_shard_size="20KB",
            sliding_window=5, config_overrides={"max_window_layers": 1}, **common,
        ),
        # q_norm / k_norm, head_dim independent of hidden_size
        "qwen3": build_dense_model(root / "qwen3", "qwen3", seed=3, head_dim=16, **common),
        "router": build_dense_model(
            root / "router", "llama", seed=0, tokenizer_dir=tokenizer_dir, num_layers=4, hidden_size=64,
            intermediate_size=128,
        ),
    }


def load_full(model_dir: Path):
    """The whole model in float32 (bf16 weights are widened exactly, as the streamed run does)."""
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def left_padded(token_lists: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    return ids, mask


def tokens_of(model_dir: Path, prompt: str) -> list[int]:
    """mergekit's prompt encoding: BOS as text + prompt, no special tokens added."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False)["input_ids"]


class RouterInputs:
    """Records every layer's router input (post_attention_layernorm output) of a full model."""

    def __init__(self, model) -> None:
        self.captured: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(model.model.layers):
            layer.post_attention_layernorm.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def hook(_module, _args, output):
            self.captured[index] = output.detach()

        return hook


def reference_features(model, model_dir: Path, prompt: str) -> dict:
    """Per-layer vectors of one unpadded prompt, computed by the full model."""
    recorder = RouterInputs(model)
    ids = torch.tensor([tokens_of(model_dir, prompt)])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    layers = range(model.config.num_hidden_layers)
    return {
        "last": [hidden[i][0, -1] for i in layers],
        "mean": [hidden[i][0].mean(0) for i in layers],
        "router_last": [recorder.captured[i][0, -1] for i in layers],
        "router_mean": [recorder.captured[i][0].mean(0) for i in layers],
        "embed_sum": model.model.embed_tokens.weight[ids[0]].sum(0).detach(),
    }


def unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


def reference_router(model, model_dir: Path, experts, key: str, layer: int) -> torch.Tensor:
    """mean(positive) - mean(negative), normalised (the hidden-state modes' recipe)."""
    rows = []
    for expert in experts:
        positive = torch.stack([reference_features(model, model_dir, p)[key][layer] for p in expert.positive_prompts]).mean(0)
        if expert.negative_prompts:
            positive = positive - torch.stack(
                [reference_features(model, model_dir, p)[key][layer] for p in expert.negative_prompts]
            ).mean(0)
        rows.append(unit(positive))
    return torch.stack(rows)


def reference_cheap_embed(model, model_dir: Path, experts) -> torch.Tensor:
    """mergekit's cheap_embed: each prompt set's summed embeddings normalised, then pos - neg normalised."""
    rows = []
    for expert in experts:
        vector = unit(sum(reference_features(model, model_dir, p)["embed_sum"] for p in expert.positive_prompts))
        if expert.negative_prompts:
            vector = vector - unit(sum(reference_features(model, model_dir, p)["embed_sum"] for p in expert.negative_prompts))
        rows.append(unit(vector))
    return torch.stack(rows)


# ---- the layer-streamed forward ------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_streamed_forward_matches_full_model(models, family):
    model_dir = models[family]
    model = load_full(model_dir)
    prompts = ["a list keeps items in order and allows duplicates", "bread", "def mean(values):", "the oven is hot"]
    ids, mask = left_padded([tokens_of(model_dir, p) for p in prompts])
    recorder = RouterInputs(model)
    with torch.no_grad():
        reference = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), output_hidden_states=True
        ).hidden_states
    batches = [(ids[:3], mask[:3]), (ids[3:], mask[3:])]
    states = list(iter_layer_hidden_states(model_dir, batches, want=("residual_in", "mlp_in"), progress=False))
    assert [s.index for s in states] == list(range(model.config.num_hidden_layers))
    real = mask.bool()
    for state in states:
        residual = torch.cat(state.residual_in)
        router_input = torch.cat(state.mlp_in)
        torch.testing.assert_close(residual[real], reference[state.index][real], atol=1e-5, rtol=0)
        torch.testing.assert_close(router_input[real], recorder.captured[state.index][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_packed_prompts_each_give_the_logits_of_a_run_alone(models, family):
    """Prompts packed into one row attend to themselves alone: each one's logits equal the whole model's on
    that prompt by itself, with sliding windows shorter than the prompts (mistral, qwen2's later layers)."""
    model_dir = models[family]
    model = load_full(model_dir)
    prompts = ["a list keeps items in order and allows duplicates", "bread", "def mean(values):", "the oven is hot"]
    ids = [torch.tensor([tokens_of(model_dir, p)]) for p in prompts]
    streamed = stream_sequences(model_dir, ids, progress=False)
    assert [logits.shape[1] for logits in streamed.logits] == [i.shape[1] for i in ids]
    with torch.no_grad():
        for got, one in zip(streamed.logits, ids, strict=True):
            torch.testing.assert_close(got, model(input_ids=one).logits, atol=1e-5, rtol=0)


def test_packing_refuses_an_empty_sequence():
    with pytest.raises(ValueError, match="at least one token"):
        PackedSequences((torch.tensor([[1, 2]]), torch.zeros((1, 0), dtype=torch.long)))


def test_streamed_forward_skips_the_last_layer_when_only_its_input_is_needed(models, monkeypatch):
    read_names: list[str] = []
    original = layerwise.CheckpointTensors.read

    def recording_read(self, names):
        read_names.extend(names)
        return original(self, names)

    monkeypatch.setattr(layerwise.CheckpointTensors, "read", recording_read)
    ids, mask = left_padded([[1, 5, 6]])
    states = list(iter_layer_hidden_states(models["llama"], [(ids, mask)], num_layers=2, progress=False))
    assert len(states) == 2
    assert any(n.startswith("model.layers.0.") for n in read_names)
    assert not any(n.startswith(("model.layers.1.", "model.layers.2.", "lm_head")) for n in read_names)


def test_a_token_outside_the_vocabulary_is_named(models):
    vocab = json.loads((models["llama"] / "config.json").read_text())["vocab_size"]
    ids, mask = left_padded([[1, vocab + 3]])
    with pytest.raises(ModelError, match=rf"token id {vocab + 3} is outside the embedding's {vocab} rows") as info:
        list(iter_layer_hidden_states(models["llama"], [(ids, mask)], progress=False))
    assert str(models["llama"]) in str(info.value)


def test_an_embedding_of_another_shape_is_named(models, tmp_path):
    model_dir = shutil.copytree(models["llama"], tmp_path / "wider_vocab")
    config = json.loads((model_dir / "config.json").read_text())
    config["vocab_size"] += 8
    (model_dir / "config.json").write_text(json.dumps(config))
    ids, mask = left_padded([[1, 5, 6]])
    with pytest.raises(ModelError, match=r"do not fit the model's shapes, e\.g\. model\.embed_tokens\.weight"):
        list(iter_layer_hidden_states(model_dir, [(ids, mask)], progress=False))


# ---- gate vectors against the plain computation ----------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reduction", "key"),
    [
        ("hidden", "last", "last"),
        ("hidden_avg", "last", "mean"),
        ("router_input", "last", "router_last"),
        ("router_input", "mean", "router_mean"),
    ],
)
def test_layer_modes_match_independent_computation(models, mode, reduction, key):
    model_dir = models["llama"]
    model = load_full(model_dir)
    recipe = gate_recipe(mode, SMALL_EXPERTS, token_reduction=reduction, gate_batch_size=2)
    tensors, _ = compute_gates(model_dir, recipe, progress=False)
    assert set(tensors) == {f"layer.{i}.router" for i in range(3)}
    for layer in range(3):
        expected = reference_router(model, model_dir, SMALL_EXPERTS, key, layer)
        torch.testing.assert_close(tensors[f"layer.{layer}.router"], expected, atol=1e-5, rtol=0)


def test_cheap_embed_matches_independent_computation(models):
    model_dir = models["llama"]
    tensors, _ = compute_gates(model_dir, gate_recipe("cheap_embed", SMALL_EXPERTS), progress=False)
    expected = reference_cheap_embed(load_full(model_dir), model_dir, SMALL_EXPERTS)
    for layer in range(3):
        torch.testing.assert_close(tensors[f"layer.{layer}.router"], expected, atol=1e-5, rtol=0)


def test_chat_template_wraps_each_prompt(models):
    model_dir = models["qwen3"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = "bake the bread"
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = load_full(model_dir)(input_ids=ids, output_hidden_states=True).hidden_states
    experts = (named_expert("x", (prompt,)), named_expert("y", ("import os",)))
    tensors, stats = compute_gates(model_dir, gate_recipe("hidden", experts, prompt_template="chat"), progress=False)
    assert stats["prompt_template"] == "chat"
    for layer in range(3):
        torch.testing.assert_close(tensors[f"layer.{layer}.router"][0], unit(hidden[layer][0, -1]), atol=1e-5, rtol=0)


def test_shared_expert_gate_uses_its_own_prompts(models):
    shared = named_expert("general", SMALL_EXPERTS[0].positive_prompts, SMALL_EXPERTS[0].negative_prompts)
    recipe = gate_recipe("hidden", SMALL_EXPERTS, shared_experts=(shared,))
    tensors, stats = compute_gates(models["qwen2"], recipe, progress=False)
    for layer in range(3):
        gate = tensors[f"layer.{layer}.shared_expert_gate"]
        assert gate.shape == (1, 32) and gate.dtype == torch.float32
        torch.testing.assert_close(gate[0], tensors[f"layer.{layer}.router"][0], atol=1e-6, rtol=0)
    assert stats["shared_experts"] == ["shared"]


def test_shared_experts_share_one_gate_read_from_all_their_prompts(models):
    """Two shared experts are one fused shared MLP: its gate row is computed from both experts' prompts."""
    first, second = SMALL_EXPERTS[0], SMALL_EXPERTS[1]
    fused = named_expert("both", first.positive_prompts + second.positive_prompts,
                   first.negative_prompts + second.negative_prompts)
    split, _ = compute_gates(models["qwen2"], gate_recipe("hidden", SMALL_EXPERTS, shared_experts=(first, second)),
                             progress=False)
    whole, _ = compute_gates(models["qwen2"], gate_recipe("hidden", SMALL_EXPERTS, shared_experts=(fused,)),
                             progress=False)
    for layer in range(3):
        assert split[f"layer.{layer}.shared_expert_gate"].shape == (1, 32)
        torch.testing.assert_close(split[f"layer.{layer}.shared_expert_gate"],
                                   whole[f"layer.{layer}.shared_expert_gate"], atol=0, rtol=0)
    always, _ = compute_gates(models["qwen2"], gate_recipe("hidden", SMALL_EXPERTS, shared_experts=(first,),
                                                           shared_gate="always"), progress=False)
    assert not any("shared_expert_gate" in name for name in always)


# ---- routing ---------------------------------------------------------------------------------


def routing_fraction(model, model_dir: Path, tensors: dict) -> float:
    """Share of (token, layer) pairs of each expert's own prompts whose argmax expert is that expert.

    The BOS position is left out: it is the same token at the same position for every prompt.
    """
    recorder = RouterInputs(model)
    hits = total = 0
    for expert_index, expert in enumerate(TOPIC_EXPERTS):
        for prompt in expert.positive_prompts:
            with torch.no_grad():
                model(input_ids=torch.tensor([tokens_of(model_dir, prompt)]))
            for layer, router_input in recorder.captured.items():
                choice = (router_input[0, 1:] @ tensors[f"layer.{layer}.router"].T).argmax(-1)
                hits += int((choice == expert_index).sum())
                total += choice.numel()
    return hits / total


def test_router_input_gates_route_tokens_to_their_expert(models):
    model_dir = models["router"]
    model = load_full(model_dir)
    fractions = {}
    runs = {
        "router_input/mean": gate_recipe("router_input", TOPIC_EXPERTS, token_reduction="mean"),
        "router_input/last": gate_recipe("router_input", TOPIC_EXPERTS, token_reduction="last"),
        "hidden": gate_recipe("hidden", TOPIC_EXPERTS),
        "hidden_avg": gate_recipe("hidden_avg", TOPIC_EXPERTS),
        "cheap_embed": gate_recipe("cheap_embed", TOPIC_EXPERTS),
    }
    for label, recipe in runs.items():
        tensors, _ = compute_gates(model_dir, recipe, progress=False)
        fractions[label] = routing_fraction(model, model_dir, tensors)
    print("routing fractions (chance 1/3):", json.dumps({k: round(v, 3) for k, v in fractions.items()}))
    assert fractions["router_input/mean"] > 0.5
    assert fractions["router_input/last"] > 0.5


def test_router_scale_sets_the_typical_logit_spread(models):
    model_dir = models["router"]
    model = load_full(model_dir)
    tensors, stats = compute_gates(model_dir, gate_recipe("hidden", TOPIC_EXPERTS, router_scale=2.0), progress=False)
    unscaled, _ = compute_gates(model_dir, gate_recipe("hidden", TOPIC_EXPERTS), progress=False)
    recorder = RouterInputs(model)
    per_layer: dict[int, list[torch.Tensor]] = {}
    for expert in TOPIC_EXPERTS:
        for prompt in expert.positive_prompts:
            with torch.no_grad():
                model(input_ids=torch.tensor([tokens_of(model_dir, prompt)]))
            for layer, router_input in recorder.captured.items():
                per_layer.setdefault(layer, []).append(router_input[0])
    for layer, inputs in per_layer.items():
        router = tensors[f"layer.{layer}.router"]
        spread = (torch.cat(inputs) @ router.T).std(dim=1, correction=0).median()
        assert spread.item() == pytest.approx(2.0, rel=1e-3)
        factor = stats["layers"][layer]["scale"]
        torch.testing.assert_close(router, unscaled[f"layer.{layer}.router"] * factor, rtol=1e-5, atol=0)
    assert stats["router_scale"] == 2.0


# ---- seeded modes and files ------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config_only(models, tmp_path: Path) -> Path:
    """A base directory with nothing but config.json: the prompt-free modes must not need more."""
    base = tmp_path / "config_only"
    base.mkdir()
    shutil.copyfile(models["llama"] / "config.json", base / "config.json")
    return base


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_seeded_modes_are_byte_identical_and_seed_dependent(models, tmp_path, mode):
    base = config_only(models, tmp_path)
    experts = (named_expert("a"), named_expert("b"))
    shared = (named_expert("s"),)
    digests = []
    for run, seed in enumerate([7, 7, 8]):
        tensors, stats = compute_gates(base, gate_recipe(mode, experts, shared_experts=shared, seed=seed))
        out = tmp_path / f"run{run}"
        write_gates(tensors, stats, out / "gates.safetensors", out / "gates.json")
        digests.append((sha256(out / "gates.safetensors"), sha256(out / "gates.json")))
        assert sorted(p.name for p in out.iterdir()) == ["gates.json", "gates.safetensors"]
    assert digests[0] == digests[1]
    assert digests[0][0] != digests[2][0]
    router = tensors["layer.1.router"]
    assert router.shape == (2, 32) and tensors["layer.1.shared_expert_gate"].shape == (1, 32)
    assert not torch.equal(router, tensors["layer.0.router"])
    if mode == "uniform_random":
        assert router.abs().max() <= 1 / math.sqrt(32)


def test_prompt_mode_outputs_are_byte_identical(models, tmp_path):
    digests = set()
    for run in range(2):
        tensors, stats = compute_gates(models["qwen2"], gate_recipe("router_input", SMALL_EXPERTS), progress=False)
        write_gates(tensors, stats, tmp_path / "g.safetensors", tmp_path / "g.json")
        digests.add((sha256(tmp_path / "g.safetensors"), sha256(tmp_path / "g.json")))
    assert len(digests) == 1
    stats = json.loads((tmp_path / "g.json").read_text())
    assert stats["mode"] == "router_input" and len(stats["layers"]) == 3
    expected_keys = {"cosine", "condition_number", "vector_norms", "router_input_norm", "logit_spread"}
    assert expected_keys <= set(stats["layers"][0])


# ---- degenerate gates and errors -------------------------------------------------------------


def test_near_duplicate_experts_are_reported(models, caplog):
    twins = (named_expert("left", ("bake the bread",)), named_expert("right", ("bake the bread",)))
    with caplog.at_level(logging.WARNING, logger="moeforge.gates"):
        _, stats = compute_gates(models["llama"], gate_recipe("hidden", twins), progress=False)
    assert stats["degenerate"][0]["experts"] == [0, 1]
    assert "'left'" in caplog.text and "'right'" in caplog.text
    with pytest.raises(RecipeError, match="near-identical gate vectors"):
        compute_gates(models["llama"], gate_recipe("hidden", twins, strict_gates=True), progress=False)


def recipe_document(mode: str, experts: tuple[ExpertSpec, ...], **settings) -> dict:
    """The recipe file's form of gate_recipe's recipe: what a user writes, checked by parse_recipe."""
    return {"base_model": "org/base", "gate_mode": mode, **settings,
            "experts": [{"source_model": e.source_model, "name": e.name, "positive_prompts": list(e.positive_prompts),
                         "negative_prompts": list(e.negative_prompts)} for e in experts]}


def test_unknown_mode_names_it_and_lists_the_valid_ones():
    with pytest.raises(RecipeError) as error:
        parse_recipe(recipe_document("hiden", SMALL_EXPERTS))
    assert "'hiden'" in str(error.value) and "did you mean 'hidden'" in str(error.value)
    assert all(mode in str(error.value) for mode in GATE_MODES)


def test_expert_without_positive_prompts_is_named():
    experts = (SMALL_EXPERTS[0], named_expert("lazy", (), ("salt",)))
    with pytest.raises(RecipeError, match=r"experts\[1\] \(lazy\).*'lazy' \(org/lazy\) has no positive_prompts"):
        parse_recipe(recipe_document("router_input", experts))


@pytest.mark.parametrize(("mode", "experts", "scale", "match"), [
    ("random", SMALL_EXPERTS, 1.0, "gate_mode 'random' has none"),
    ("hidden", SMALL_EXPERTS[:1], 1.0, "router_scale needs at least two experts"),
    ("hidden", SMALL_EXPERTS, float("inf"), "router_scale: inf is not a finite number"),
    ("hidden", SMALL_EXPERTS, 0, r"router_scale: 0 is less than or equal to the minimum of 0"),
])
def test_router_scale_needs_prompts_experts_and_a_positive_value(mode, experts, scale, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(recipe_document(mode, experts, router_scale=scale, experts_per_token=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_every_nonfinite_value_and_is_not_fooled_by_overflow(dtype):
    all_finite = layerwise.all_finite
    big = torch.finfo(dtype).max
    assert all_finite(torch.full((4, 3), big, dtype=dtype))  # the sum overflows, the values are finite
    assert all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.arange(5))
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        tensor = torch.ones(3, 5, dtype=dtype)
        tensor.view(-1)[[7, 11][:len(bad)]] = torch.tensor(bad, dtype=dtype)
        assert not all_finite(tensor), bad
        assert not all_finite(tensor, chunk=4), bad
