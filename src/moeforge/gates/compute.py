"""Router (gate) matrices for an MoE assembled from dense experts.

Every mode produces, per decoder layer ``i``, a router matrix ``layer.{i}.router`` [E, H]
(one row per routed expert, in recipe order) and, when the recipe has shared experts,
``layer.{i}.shared_expert_gate`` [S, H] (S = 1 for Qwen2-MoE). Only the base model runs prompts.

Modes (mergekit-moe compatible unless noted):

* ``hidden`` / ``hidden_last``: the last token of the residual stream entering layer ``i``
  (``output_hidden_states[i]``), averaged over an expert's prompts; mean(positive) minus
  mean(negative); each row L2-normalised.
* ``hidden_avg``: as ``hidden`` but the mean over each prompt's real tokens. mergekit-moe
  divides by the padded length, which makes a prompt's vector depend on the longest prompt in
  its batch; here padding never counts.
* ``cheap_embed``: the sum of a prompt set's input embeddings, normalised; the same row for
  every layer. Negative prompts are subtracted after each set is normalised and the difference
  is normalised again, as mergekit-moe does.
* ``random``: seeded ``randn`` rows (unnormalised); ``uniform_random``: U(-1/sqrt(H), 1/sqrt(H)).
  Neither reads prompts, weights or tokenizer. Each (seed, layer, router|shared) triple seeds its
  own generator through a hash, so a layer's matrix does not depend on evaluation order and the
  same seed always gives the same bytes.
* ``router_input`` (moeforge): the vector the router in place of layer ``i``'s MLP really sees,
  ``post_attention_layernorm(h + attn(input_layernorm(h)))``, reduced over tokens by
  ``token_reduction`` (``last`` or ``mean`` over real tokens), averaged over prompts, minus the
  negatives' mean, normalised. The ``hidden`` modes describe the residual stream *before* the
  layer's attention and norm, a different vector from the one the router is applied to.

Prompt modes run the base model one decoder layer at a time (see ``layerwise``), so memory
stays near one layer plus activations whatever the model size; hidden-state computation is
float32 throughout.

``router_scale``. Selection (argmax / top-k) is invariant to a positive scale of a layer's
router, but the mixing weights are not: Mixtral renormalises the softmax over the top-k, so the
scale decides how evenly the top-k experts mix; Qwen MoE without ``norm_topk_prob`` uses raw
softmax probabilities, so the scale also sets the magnitude of the routed output. With unit rows
the logits are ``|x| cos(x, w_e)``, where ``|x|`` (the router input's norm) is set by the RMSNorm
gain and differs from layer to layer and model to model; the resulting sharpness is an accident.
A float ``router_scale`` = c calibrates each layer on the prompts' router inputs (all real tokens
of all prompts): the layer's rows are multiplied by ``c / median_t std_e(x_t . w_e)``, so the
typical per-token spread of logits across experts becomes c (c = 1: softmax weights vary by
factors of a few, neither one-hot nor uniform). The calibration needs the base model's router
inputs, so it is rejected for the prompt-free modes; it applies to the routed router only, not to
the shared-expert gate (a sigmoid of a single logit, kept as mergekit-moe writes it).
``None`` (the default) means no scaling: that is what mergekit-moe writes, so recipes ported from
it give the same router, and a model that will be fine-tuned does not need calibrated logits.

Degenerate gates: two routed experts whose rows at a layer have cosine similarity above
``DEGENERATE_COSINE`` = 0.99 (an angle under 8.1 degrees) receive almost the same logit for every
token, so that layer's router cannot tell them apart. This is reported per expert pair with the
layers where it happens (a warning, or a ``RecipeError`` under ``strict_gates``). A row whose
unnormalised vector vanishes (positive and negative prompts cancel) is reported the same way. The
condition number of every layer's matrix is recorded too, with mergekit-moe's warning when it
exceeds 5 (which does not say which experts are at fault; the cosine check does).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeforge.errors import ModelError, RecipeError
from moeforge.gates.key import gates_recipe, gates_settings
from moeforge.io.fetch import weights_dir_of
from moeforge.io.files import dumps_json, write_bytes
from moeforge.io.hf_load import load_tokenizer
from moeforge.io.safetensors_file import TORCH_NAME
from moeforge.numbers import report_number
from moeforge.plan.plan_json import read_plan
from moeforge.plan.prompts import render_prompt
from moeforge.plan.recipe import PROMPTLESS_GATE_MODES, Recipe
from moeforge.runtime.devices import require_device
from moeforge.runtime.layerwise import (
    input_embeddings,
    iter_layer_hidden_states,
    load_config,
)

HIDDEN_MODES = ("hidden", "hidden_last", "hidden_avg")
DEGENERATE_COSINE = 0.99
#: mergekit-moe warns when a layer's router matrix has a condition number above this.
ILL_CONDITIONED = 5.0
_ZERO_NORM = 1e-8

log = logging.getLogger(__name__)


def compute_gates(base_dir: Path, recipe: Recipe, *, progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Router matrices for every layer of the base model, and the stats for ``gates.json``, as the recipe's gate
    settings ask (a recipe checked by ``parse_recipe``: the settings are not checked again here).

    Returns ``{"layer.{i}.router": [E, H] float32}`` plus ``"layer.{i}.shared_expert_gate": [1, H]``
    when the recipe's shared experts have a prompt-computed gate (``Recipe.shared_gate_group``).
    """
    config = load_config(Path(base_dir))
    num_layers, hidden_size = config.num_hidden_layers, config.hidden_size
    if recipe.gate_mode in PROMPTLESS_GATE_MODES:
        result = _random_gates(recipe, num_layers, hidden_size)
    else:
        result = _prompt_gates(Path(base_dir), recipe, num_layers, progress)
    tensors = _tensor_dict(result, len(recipe.experts))
    stats = _stats(recipe, result, num_layers, hidden_size)
    _report_degenerate(recipe, stats)
    return tensors, stats


@dataclass
class _Result:
    """Rows per layer for all groups (routed experts first), their pre-normalisation norms, and
    the router-input measurements of the layers where they were taken."""

    rows: list[torch.Tensor]
    norms: list[torch.Tensor]
    calibration: dict[int, dict] = field(default_factory=dict)
    prompt_info: dict = field(default_factory=dict)


# ---- prompt-free modes -------------------------------------------------------------------


def _generator(seed: int, layer: int, stream: str) -> torch.Generator:
    """A generator for one (seed, layer, stream), independent of any other draw."""
    digest = hashlib.sha256(f"moeforge.gates/{stream}/{seed}/{layer}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _draw(recipe: Recipe, layer: int, stream: str, count: int, hidden_size: int) -> torch.Tensor:
    generator = _generator(recipe.seed, layer, stream)
    if recipe.gate_mode == "random":
        return torch.randn((count, hidden_size), generator=generator, dtype=torch.float32)
    bound = 1.0 / math.sqrt(hidden_size)
    return (torch.rand((count, hidden_size), generator=generator, dtype=torch.float32) * 2 - 1) * bound


def _random_gates(recipe: Recipe, num_layers: int, hidden_size: int) -> _Result:
    rows = []
    for layer in range(num_layers):
        parts = [_draw(recipe, layer, "router", len(recipe.experts), hidden_size)]
        if recipe.shared_gate_group():
            parts.append(_draw(recipe, layer, "shared", 1, hidden_size))
        rows.append(torch.cat(parts))
    return _Result(rows=rows, norms=[r.norm(dim=-1) for r in rows])


# ---- prompts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _PromptTable:
    """Unique rendered prompts, their token ids, and which prompts each group uses."""

    token_ids: list[list[int]]
    positive: list[list[int]]
    negative: list[list[int]]




def _prompt_table(tokenizer, recipe: Recipe) -> _PromptTable:
    """Every prompt has a token: validation checked them with this tokenizer (moeforge.plan.prompts)."""
    index: dict[str, int] = {}
    token_ids: list[list[int]] = []

    def lookup(prompt: str) -> int:
        text = render_prompt(tokenizer, prompt, recipe.prompt_template)
        if text not in index:
            index[text] = len(token_ids)
            token_ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        return index[text]

    positive, negative = [], []
    for group in recipe.gate_groups():
        positive.append([lookup(p) for p in group.positive_prompts])
        negative.append([lookup(p) for p in group.negative_prompts])
    return _PromptTable(token_ids, positive, negative)


def _pad_id(tokenizer) -> int:
    """Any valid id works (padding is masked); prefer the tokenizer's own pad token."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@dataclass(frozen=True)
class _Batches:
    """Left-padded batches of prompts, sorted by length to waste little padding."""

    inputs: list[tuple[torch.Tensor, torch.Tensor]]
    order: list[int]  # prompt index of every row, batches concatenated


def _make_batches(token_ids: list[list[int]], batch_size: int, pad_id: int) -> _Batches:
    order = sorted(range(len(token_ids)), key=lambda k: (len(token_ids[k]), k))
    inputs = []
    for start in range(0, len(order), batch_size):
        rows = [token_ids[k] for k in order[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[row, width - len(tokens) :] = 1
        inputs.append((ids, mask))
    return _Batches(inputs, order)


def _reduce(states: list[torch.Tensor], batches: _Batches, how: str) -> torch.Tensor:
    """One vector per prompt ([N, H], prompt order): last token, or mean over real tokens."""
    parts = []
    for hidden, (_, mask) in zip(states, batches.inputs):
        if how == "last":
            parts.append(hidden[:, -1].float().cpu())
        else:
            weights = mask.to(hidden.device, torch.float32).unsqueeze(-1)
            parts.append(((hidden.float() * weights).sum(1) / weights.sum(1)).cpu())
    stacked = torch.cat(parts)
    result = torch.empty_like(stacked)
    result[torch.tensor(batches.order)] = stacked
    return result


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm(dim=-1, keepdim=True).clamp(min=_ZERO_NORM)


def _group_rows(features: torch.Tensor, table: _PromptTable, normalise_sets: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [G, H] (unit) and their norms before normalisation, from per-prompt features."""
    vectors = []
    for positive, negative in zip(table.positive, table.negative):
        vector = _set_vector(features, positive, normalise_sets)
        if negative:
            vector = vector - _set_vector(features, negative, normalise_sets)
        vectors.append(vector)
    stacked = torch.stack(vectors)
    return _unit(stacked), stacked.norm(dim=-1)


def _set_vector(features: torch.Tensor, indices: list[int], normalise: bool) -> torch.Tensor:
    mean = features[indices].mean(0)
    return _unit(mean) if normalise else mean


def _prompt_gates(base_dir: Path, recipe: Recipe, num_layers: int, progress: bool) -> _Result:
    tokenizer = load_tokenizer(base_dir, ModelError, "the base model's tokenizer",
                               "make sure the tokenizer files were fetched with the base model")
    table = _prompt_table(tokenizer, recipe)
    batches = _make_batches(table.token_ids, recipe.gate_batch_size, _pad_id(tokenizer))
    info = {"count": len(table.token_ids), "tokens": sum(len(t) for t in table.token_ids)}
    if recipe.gate_mode == "cheap_embed":
        result = _cheap_embed_gates(base_dir, recipe, table, batches, num_layers, progress)
    else:
        result = _layer_gates(base_dir, recipe, table, batches, progress)
    result.prompt_info = info
    return result


def _cheap_embed_gates(
    base_dir: Path, recipe: Recipe, table: _PromptTable, batches: _Batches, num_layers: int, progress: bool
) -> _Result:
    embeddings = input_embeddings(base_dir)
    features = torch.stack([embeddings[torch.tensor(ids)].sum(0) for ids in table.token_ids])
    del embeddings
    rows, norms = _group_rows(features, table, normalise_sets=True)
    result = _Result(rows=[rows] * num_layers, norms=[norms] * num_layers)
    if recipe.router_scale is not None:
        states = iter_layer_hidden_states(
            base_dir, batches.inputs, device=recipe.gate_device, want=("mlp_in",), progress=progress
        )
        result.calibration = {s.index: _calibrate(recipe, s.index, s.mlp_in, batches, rows) for s in states}
    return result


def _layer_gates(base_dir: Path, recipe: Recipe, table: _PromptTable, batches: _Batches, progress: bool) -> _Result:
    """hidden*, router_input: one pass over the layers, rows computed as each layer goes by."""
    use_residual = recipe.gate_mode in HIDDEN_MODES
    want = ["residual_in"] if use_residual else ["mlp_in"]
    if use_residual and recipe.router_scale is not None:
        want.append("mlp_in")
    if use_residual:
        how = "mean" if recipe.gate_mode == "hidden_avg" else "last"
    else:
        how = recipe.token_reduction
    result = _Result(rows=[], norms=[])
    states = iter_layer_hidden_states(base_dir, batches.inputs, device=recipe.gate_device, want=want, progress=progress)
    for state in states:
        source = state.residual_in if use_residual else state.mlp_in
        rows, norms = _group_rows(_reduce(source, batches, how), table, normalise_sets=False)
        result.rows.append(rows)
        result.norms.append(norms)
        if state.mlp_in is not None:
            result.calibration[state.index] = _calibrate(recipe, state.index, state.mlp_in, batches, rows)
    return result


def _calibrate(recipe: Recipe, layer: int, mlp_in: list[torch.Tensor], batches: _Batches, rows: torch.Tensor) -> dict:
    """Typical router-input norm and logit spread at one layer, and the scale they imply."""
    tokens = torch.cat([h.float()[mask.to(h.device).bool()].cpu() for h, (_, mask) in zip(mlp_in, batches.inputs)])
    router = rows[: len(recipe.experts)]
    spread = float((tokens @ router.T).std(dim=1, correction=0).median()) if len(router) > 1 else float("nan")
    entry = {"router_input_norm": float(tokens.norm(dim=-1).median()), "logit_spread": spread}
    if recipe.router_scale is not None:
        if not spread > 0:
            raise RecipeError(
                f"router_scale cannot be calibrated at layer {layer}: every expert gets the same logit",
                where="router_scale",
                fix="make the experts' prompts distinct, or remove router_scale",
            )
        entry["scale"] = recipe.router_scale / spread
    return entry


# ---- results -----------------------------------------------------------------------------


def _tensor_dict(result: _Result, num_routed: int) -> dict[str, torch.Tensor]:
    scales = {i: c["scale"] for i, c in result.calibration.items() if "scale" in c}
    tensors = {}
    for layer, rows in enumerate(result.rows):
        router = rows[:num_routed] * scales.get(layer, 1.0)
        tensors[f"layer.{layer}.router"] = router.float().contiguous()
        if len(rows) > num_routed:
            tensors[f"layer.{layer}.shared_expert_gate"] = rows[num_routed:].float().contiguous()
    return tensors




def _layer_stats(
    layer: int, rows: torch.Tensor, norms: torch.Tensor, num_routed: int, calibration: dict | None
) -> dict:
    router = rows[:num_routed].double()
    unit = _unit(router)
    cosine = unit @ unit.T
    entry = {
        "layer": layer,
        "vector_norms": [report_number(n) for n in norms[:num_routed]],
        "cosine": [[report_number(cosine[a, b]) for b in range(num_routed)] for a in range(num_routed)],
        "condition_number": report_number(torch.linalg.cond(router)),
    }
    if len(rows) > num_routed:
        entry["shared_vector_norms"] = [report_number(n) for n in norms[num_routed:]]
    if calibration:
        entry.update({key: report_number(value) for key, value in calibration.items()})
    return entry


def _stats(recipe: Recipe, result: _Result, num_layers: int, hidden_size: int) -> dict:
    num_routed = len(recipe.experts)
    layers = [
        _layer_stats(i, result.rows[i], result.norms[i], num_routed, result.calibration.get(i))
        for i in range(num_layers)
    ]
    stats = {
        "mode": recipe.gate_mode,
        "seed": recipe.seed,
        "prompt_template": recipe.prompt_template,
        "token_reduction": recipe.token_reduction,
        "router_scale": recipe.router_scale,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "experts": [e.name for e in recipe.experts],
        "shared_experts": [group.name for group in recipe.gate_groups()[len(recipe.experts):]],
        "prompts": result.prompt_info,
        "degenerate_cosine": DEGENERATE_COSINE,
        "degenerate": _degenerate(layers, recipe),
        "layers": layers,
    }
    stats["ill_conditioned_above"] = ILL_CONDITIONED
    stats["warnings"] = [_degenerate_message(recipe, d) for d in stats["degenerate"]] + _conditioning(layers, recipe)
    return stats


def _conditioning(layers: list[dict], recipe: Recipe) -> list[str]:
    """mergekit-moe's warning: a router matrix with condition number above 5 routes poorly.

    Random rows are exempt, as for the degenerate check.
    """
    if recipe.gate_mode in PROMPTLESS_GATE_MODES:
        return []
    bad = [(e["layer"], e["condition_number"]) for e in layers
           if e["condition_number"] is None or e["condition_number"] > ILL_CONDITIONED]
    if not bad:
        return []
    worst = max((c for _, c in bad if c is not None), default=None)
    return [f"router matrix is ill-conditioned (condition number above {ILL_CONDITIONED}, up to "
            f"{worst if worst is not None else 'infinite'}) at layer(s) {', '.join(str(i) for i, _ in bad)}: "
            "the experts' prompts give similar hidden states there, so routing may be degenerate; "
            "make the experts' positive_prompts more distinct or add negative_prompts"]


def _degenerate(layers: list[dict], recipe: Recipe) -> list[dict]:
    """Expert pairs with near-duplicate rows and experts with vanishing rows, with their layers.

    Random rows are exempt: their similarity is chance, not a property of the prompts.
    """
    if recipe.gate_mode in PROMPTLESS_GATE_MODES:
        return []
    found: dict[tuple, dict] = {}
    for entry in layers:
        matrix = entry["cosine"]
        for a, b in ((a, b) for a in range(len(matrix)) for b in range(a + 1, len(matrix))):
            cosine = matrix[a][b]
            if cosine is not None and cosine > DEGENERATE_COSINE:
                item = found.setdefault(
                    ("pair", a, b), {"kind": "duplicate", "experts": [a, b], "layers": [], "max_cosine": cosine}
                )
                item["layers"].append(entry["layer"])
                item["max_cosine"] = max(item["max_cosine"], cosine)
        for expert, norm in enumerate(entry["vector_norms"]):
            if norm is not None and norm < _ZERO_NORM:
                item = found.setdefault(("zero", expert), {"kind": "zero", "experts": [expert], "layers": []})
                item["layers"].append(entry["layer"])
    return list(found.values())


def _expert_label(recipe: Recipe, index: int) -> str:
    return f"experts[{index}] ({recipe.experts[index].name!r})"


def _degenerate_message(recipe: Recipe, item: dict) -> str:
    layers = ", ".join(map(str, item["layers"]))
    if item["kind"] == "zero":
        return (
            f"{_expert_label(recipe, item['experts'][0])} has a zero gate vector at layer(s) {layers}: "
            "its positive and negative prompts cancel out"
        )
    a, b = item["experts"]
    return (
        f"{_expert_label(recipe, a)} and {_expert_label(recipe, b)} have near-identical gate vectors "
        f"(cosine up to {item['max_cosine']} > {DEGENERATE_COSINE}) at layer(s) {layers}: "
        "the router cannot tell them apart there"
    )


def _report_degenerate(recipe: Recipe, stats: dict) -> None:
    if recipe.strict_gates and stats["degenerate"]:
        raise RecipeError(
            "degenerate gates: " + "; ".join(_degenerate_message(recipe, d) for d in stats["degenerate"]),
            where=f"gate_mode {recipe.gate_mode}, expert prompts",
            fix="make those experts' positive_prompts more distinct or add negative_prompts, "
            "or set strict_gates: false to accept the gates",
        )
    for message in stats["warnings"]:
        log.warning("%s", message)


def write_gates(tensors: dict[str, torch.Tensor], stats: dict, out_safetensors: Path, out_json: Path) -> None:
    """Write both outputs atomically (temporary name, fsync, rename); same inputs, same bytes.

    The safetensors metadata holds only ``format``: safetensors stores metadata in a hash map
    whose key order varies from run to run, and the settings are in ``gates.json`` anyway. Each tensor
    is written from its own copy: several layers may hold one tensor (cheap_embed's vectors are the same
    at every layer), and safetensors refuses tensors that share memory.
    """
    from safetensors.torch import save

    ordered = {name: tensors[name].clone() for name in sorted(tensors, key=_tensor_sort_key)}
    write_bytes(Path(out_safetensors), save(ordered, metadata={"format": "pt"}))
    write_bytes(Path(out_json), dumps_json(stats).encode())


def _tensor_sort_key(name: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))


def gates_for_settings(settings: dict, base_weights: Path, out_tensors: Path, out_stats: Path) -> None:
    """The gates step: the routers that ``settings`` (``moeforge.gates.key.gates_settings``) ask for, from the
    base model's weights.

    The thread count is the settings', which follow from the plan alone, never from the cores the job was
    given (``--cores``): another count may sum in another order, and a rerun must give the same bytes.
    """
    recipe = gates_recipe(settings)
    torch.set_num_threads(settings["threads"])
    require_device(recipe.gate_device, "gate_device")
    tensors, stats = compute_gates(weights_dir_of(base_weights), recipe)
    # Stored in the output dtype, so shard jobs copy router bytes as they are (no torch there);
    # gates.json's statistics are computed in float32 before this cast.
    dtype = getattr(torch, TORCH_NAME[settings["dtype"]])
    write_gates({name: t.to(dtype) for name, t in tensors.items()}, stats, out_tensors, out_stats)


def gates_for_plan(plan_json: Path, base_weights: Path, out_tensors: Path, out_stats: Path) -> None:
    """The gates of the merge whose plan is ``plan_json`` (the settings the workflow's gates job gets)."""
    gates_for_settings(gates_settings(read_plan(plan_json)), base_weights, out_tensors, out_stats)
