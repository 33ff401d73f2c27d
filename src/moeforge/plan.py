"""Pre-flight validation and the merge plan: the single truth every later stage executes.

Everything here is decided from metadata (config.json, tokenizer files, safetensors headers)
before any weight is downloaded. The plan table has one row per output tensor; shard jobs
execute rows and know nothing about architectures, so Mixtral, Qwen2-MoE and Qwen3-MoE differ
only in templates and in this planning.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pandera.pandas as pa

from moeforge import architectures as arch
from moeforge.architectures import InputFamily, OutputFamily, TensorSpec
from moeforge.errors import ModelError, RecipeError
from moeforge.fileio import write_json, write_text
from moeforge.inventory import InventoryEntry, read_inventory
from moeforge.params import normalise
from moeforge.recipe import ExpertSpec, Recipe
from moeforge.safetensors_io import ITEMSIZE, SAFETENSORS_NAME, TORCH_NAME
from moeforge.shards import GATES_SOURCE, shape_of as _shape, tensor_shape
from moeforge.sources import parse_ref

PLAN_COLUMNS = ["target_name", "part", "concat_dim", "shard", "source", "source_name", "source_file", "dtype_in",
                "dtype_out", "shape", "transform"]
FLOAT_DTYPES = ("F32", "F16", "BF16")
ZEROS_SOURCE = "zeros"
#: Width of the all-zero shared expert written when a Qwen2-MoE recipe has none: small, and
#: divisible by every usual tensor-parallel degree (engines shard this dimension).
ZERO_SHARED_INTERMEDIATE = 128
_OP = r"(cast|zeros|scale:[-0-9.e+]+|noise:[0-9.e+-]+@\d+)"

PLAN_SCHEMA = pa.DataFrameSchema(
    {
        "target_name": pa.Column(str),
        "part": pa.Column(int, pa.Check.ge(0)),
        "concat_dim": pa.Column(int, pa.Check.isin([0, 1])),
        "shard": pa.Column(str, pa.Check.str_matches(r"^(globals|layer-\d+)$")),
        "source": pa.Column(str, pa.Check.str_length(min_value=1)),
        "source_name": pa.Column(str),
        "source_file": pa.Column(str),
        "dtype_in": pa.Column(str, pa.Check.isin(FLOAT_DTYPES)),
        "dtype_out": pa.Column(str, pa.Check.isin(FLOAT_DTYPES)),
        "shape": pa.Column(str, pa.Check.str_matches(r"^\d+(,\d+)*$")),
        "transform": pa.Column(str, pa.Check.str_matches(rf"^(copy|{_OP}(;{_OP})*)$")),
    },
    checks=[pa.Check(lambda df: (df.groupby("shard")["target_name"].count()
                                 .drop("globals", errors="ignore").nunique() <= 1),
                     error="layers have different tensor counts (a layer is incomplete)"),
            pa.Check(lambda df: (df["source"] != ZEROS_SOURCE) | (df["transform"] == "zeros"),
                     error="zeros rows must have the zeros transform")],
    unique=["target_name", "part"],
    strict=True,
    ordered=True,
)


@dataclass
class Source:
    """One source model as validation sees it."""

    ref: str
    slug: str
    meta_dir: Path
    config: dict[str, Any]
    family: InputFamily
    params: dict[str, Any]
    inventory: dict[str, InventoryEntry]
    source_json: dict[str, Any]


@dataclass
class PlanContext:
    """Findings collected while planning: decisions (what and why) and warnings."""

    decisions: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def decide(self, what: str, why: str) -> None:
        self.decisions.append({"what": what, "why": why})


def load_source(ref: str, meta_dir: Path) -> Source:
    """Read a fetched source's metadata and classify it by model_type."""
    config = json.loads((meta_dir / "config.json").read_text())
    where = f"model {ref} (config.json)"
    model_type = config.get("model_type")
    if not model_type:
        raise ModelError("config.json has no model_type", where, "is this a transformers causal LM?")
    family = arch.input_family_for(model_type, where)
    params = normalise(config, family, where)
    return Source(ref=ref, slug=parse_ref(ref).slug, meta_dir=meta_dir, config=config, family=family,
                  params=params, inventory=read_inventory(meta_dir / "inventory.tsv"),
                  source_json=json.loads((meta_dir / "source.json").read_text()))


def _expected(source: Source, spec: TensorSpec, layer: int | None) -> tuple[str, tuple[int, ...]]:
    name = spec.name if layer is None else source.family.layer_name(layer, spec)
    return name, spec.expected_shape(source.params)


def check_inventory(source: Source, roles: str = "all") -> None:
    """Every tensor the template requires exists, with the shape the config implies, as a float."""
    fam, p = source.family, source.params
    groups: list[tuple[Mapping[str, TensorSpec], int | None]] = []
    if roles == "all":
        groups.append((fam.globals, None))
    layer_specs = {**fam.attention, **fam.mlp} if roles == "all" else dict(fam.mlp)
    for layer in range(p["num_hidden_layers"]):
        groups.append((layer_specs, layer))
    for specs, layer in groups:
        for spec in specs.values():
            if not spec.present(p):
                continue
            name, shape = _expected(source, spec, layer)
            entry = source.inventory.get(name)
            if entry is None:
                hint = ("the config says tie_word_embeddings is false; if the model ties its embeddings, "
                        "its config.json should say true" if spec.role == "lm_head"
                        else "the checkpoint is incomplete or the config does not match the weights")
                raise ModelError(f"tensor {name!r} is missing from the weights", f"model {source.ref}", hint)
            if entry.shape != shape:
                raise ModelError(
                    f"tensor {name!r} has shape {list(entry.shape)} but config.json implies {list(shape)}",
                    f"model {source.ref} ({entry.file})", "the config does not match the weights")
            if entry.dtype not in FLOAT_DTYPES:
                raise ModelError(f"tensor {name!r} has dtype {entry.dtype}; only F32/F16/BF16 can be merged",
                                 f"model {source.ref} ({entry.file})",
                                 "quantized checkpoints cannot be merged: use the unquantized model")


def _tokenizer_vocab(source: Source) -> dict[str, int] | None:
    path = source.meta_dir / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    vocab = dict(data.get("model", {}).get("vocab") or {})
    for tok in data.get("added_tokens", []):
        vocab[tok["content"]] = tok["id"]
    return vocab


def _rope_text(rope: Mapping[str, Any]) -> str:
    return f"rope_theta={rope['theta']:g}, scaling={json.dumps(rope['scaling'], sort_keys=True)}"


def check_against_base(base: Source, other: Source, role: str, recipe: Recipe, ctx: PlanContext) -> None:
    """An expert must fit the base: same shapes and semantics of what the merge combines.

    A shared expert may be wider or narrower than the base's MLP: its width is its own.
    """
    for key in base.family.agree:
        if key == "intermediate_size" and role == "shared expert":
            continue
        if base.params[key] != other.params[key]:
            raise ModelError(
                f"{key} is {other.params[key]!r} but the base model {base.ref} has {base.params[key]!r}",
                f"{role} {other.ref}", "every expert must have the base model's shape; pick a fine-tune of the same base")
    if base.params["rope"] != other.params["rope"]:
        message = (f"rope settings differ: {_rope_text(other.params['rope'])} vs the base's "
                   f"{_rope_text(base.params['rope'])}; the merged model uses the base's attention, so this "
                   f"expert's MLP would see positions encoded differently from its training")
        if not recipe.allow_rope_mismatch:
            raise ModelError(message, f"{role} {other.ref}", "set allow_rope_mismatch: true to merge anyway")
        ctx.warnings.append(f"{role} {other.ref}: {message} (allowed by allow_rope_mismatch)")
    if base.params["rms_norm_eps"] != other.params["rms_norm_eps"]:
        ctx.warnings.append(f"{role} {other.ref}: rms_norm_eps {other.params['rms_norm_eps']} differs from the "
                            f"base's {base.params['rms_norm_eps']}; the base's value is used")
    if base.params["tied"] != other.params["tied"]:
        ctx.warnings.append(f"{role} {other.ref}: tie_word_embeddings {other.params['tied']} differs from the base; "
                            "embeddings come from the base, so this does not affect the merge")
    if base.family.name != other.family.name:
        ctx.decide(f"{role} {other.ref} is {other.family.name}, the base is {base.family.name}",
                   "their tensor shapes and MLP semantics agree, so they can be mixed")
    base_vocab, other_vocab = _tokenizer_vocab(base), _tokenizer_vocab(other)
    if base_vocab is not None and other_vocab is not None and base_vocab != other_vocab:
        diff = sorted(set(base_vocab.items()) ^ set(other_vocab.items()))[:3]
        raise ModelError(f"tokenizer vocabulary differs from the base's (e.g. {diff})", f"{role} {other.ref}",
                         "experts must share the base's tokenizer; a different vocabulary means a different model")


def output_family(recipe: Recipe, base: Source) -> OutputFamily:
    return arch.output_family_for(recipe.architecture or base.family.default_output)


def check_representable(base: Source, experts: list[Source], out: OutputFamily) -> None:
    """Refuse what the output family cannot hold (or needs and cannot get), never drop or invent silently."""
    for role in out.required_attention:
        spec = base.family.attention.get(role)
        if spec is None or not spec.present(base.params):
            raise ModelError(
                f"{out.name} needs {out.attention[role]} ({role}), which the {base.family.name} base does not have "
                f"and which has no exact neutral value", f"base model {base.ref}",
                f"use a base of a family that has it, or the {base.family.default_output} output")
    for spec in base.family.attention.values():
        if spec.present(base.params) and spec.role not in out.attention:
            raise ModelError(
                f"the base has {spec.name} ({spec.role}), which {out.name} has no place for; "
                f"dropping it would change the model's outputs", f"base model {base.ref}",
                f"choose an output architecture that keeps it (e.g. the {base.family.default_output} default)")
    for source in experts:
        for spec in source.family.mlp.values():
            if spec.present(source.params) and spec.role not in out.experts:
                raise ModelError(f"the model has MLP tensor {spec.name} ({spec.role}), which {out.name} "
                                 "experts cannot hold", f"expert {source.ref}",
                                 "choose a model without MLP biases or another output architecture")


def _noise_seed(seed: int, target: str) -> int:
    """A per-tensor seed: results do not depend on which job or order computes them."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{target}".encode()).digest()[:7], "little")


def _transform(dtype_in: str, dtype_out: str, ops: list[str]) -> str:
    steps = list(ops)
    if dtype_in != dtype_out and not steps:
        steps.append("cast")
    return ";".join(steps) or "copy"


def _row(target: str, shard: str, source: Source, name: str, dtype_out: str, ops: list[str] = (),
         part: int = 0, concat_dim: int = 0) -> dict[str, Any]:
    entry = source.inventory[name]
    return {"target_name": target, "part": part, "concat_dim": concat_dim, "shard": shard, "source": source.slug,
            "source_name": name, "source_file": entry.file, "dtype_in": entry.dtype, "dtype_out": dtype_out,
            "shape": ",".join(map(str, entry.shape)), "transform": _transform(entry.dtype, dtype_out, list(ops))}


def _zeros_row(target: str, shard: str, shape: tuple[int, ...], dtype_out: str) -> dict[str, Any]:
    return {"target_name": target, "part": 0, "concat_dim": 0, "shard": shard, "source": ZEROS_SOURCE,
            "source_name": "", "source_file": "", "dtype_in": dtype_out, "dtype_out": dtype_out,
            "shape": ",".join(map(str, shape)), "transform": "zeros"}


def _gates_row(target: str, shard: str, name: str, shape: tuple[int, ...], dtype_out: str) -> dict[str, Any]:
    # The gates rule writes routers in the output dtype: these rows are plain byte copies.
    return {"target_name": target, "part": 0, "concat_dim": 0, "shard": shard, "source": GATES_SOURCE,
            "source_name": name, "source_file": "gates.safetensors", "dtype_in": dtype_out, "dtype_out": dtype_out,
            "shape": ",".join(map(str, shape)), "transform": "copy"}


def _mlp_ops(expert: ExpertSpec, role: str, target: str, seed: int, extra_scale: float = 1.0) -> list[str]:
    """noise_scale on all three matrices; residual_scale (times any extra factor) on down only."""
    ops = []
    if expert.noise_scale:
        ops.append(f"noise:{expert.noise_scale!r}@{_noise_seed(seed, target)}")
    scale = (expert.residual_scale if expert.residual_scale is not None else 1.0) * extra_scale
    if role == "down_proj" and scale != 1.0:
        ops.append(f"scale:{scale!r}")
    return ops


def _attention_rows(layer: int, shard: str, base: Source, out: OutputFamily, dtype_out: str) -> list[dict[str, Any]]:
    """Every attention/norm role the output has: from the base, or zeros where that is exact."""
    rows = []
    for role, out_name in out.attention.items():
        spec = base.family.attention.get(role)
        target = out.layer_name(layer, out_name)
        if spec is not None and spec.present(base.params):
            rows.append(_row(target, shard, base, base.family.layer_name(layer, spec), dtype_out))
        elif role in out.zero_fill:
            shape = tuple(arch.evaluate(e, base.params) for e in out.zero_fill[role])
            rows.append(_zeros_row(target, shard, shape, dtype_out))
    return rows


def _shared_rows(layer: int, shard: str, recipe: Recipe, shared: list[Source], out: OutputFamily, dtype_out: str,
                 hidden: int) -> list[dict[str, Any]]:
    """Qwen2-MoE's one shared expert from 0..N recipe shared experts.

    N shared MLPs sum to one MLP of N-fold width (gate/up rows and down columns concatenated);
    none gives an all-zero expert, whose contribution is exactly zero. Under ``shared_gate:
    always`` the gate weight is zero, sigmoid(0) = 0.5, and the down projection is doubled (an
    exact operation in floating point) so the shared expert contributes at full strength.
    """
    rows: list[dict[str, Any]] = []
    gate_target = out.layer_name(layer, out.shared_expert_gate)
    if not shared:
        for role, name in out.shared_expert.items():
            shape = (hidden, ZERO_SHARED_INTERMEDIATE) if role == "down_proj" else (ZERO_SHARED_INTERMEDIATE, hidden)
            rows.append(_zeros_row(out.layer_name(layer, name), shard, shape, dtype_out))
        rows.append(_zeros_row(gate_target, shard, (1, hidden), dtype_out))
        return rows
    always = recipe.shared_gate == "always"
    for role, name in out.shared_expert.items():
        target = out.layer_name(layer, name)
        for part, (spec_e, source) in enumerate(zip(recipe.shared_experts, shared)):
            src_name = source.family.layer_name(layer, source.family.mlp[role])
            ops = _mlp_ops(spec_e, role, f"{target}#{part}", recipe.seed, 2.0 if always else 1.0)
            rows.append(_row(target, shard, source, src_name, dtype_out, ops, part=part,
                             concat_dim=1 if role == "down_proj" else 0))
    if always:
        rows.append(_zeros_row(gate_target, shard, (1, hidden), dtype_out))
    else:
        rows.append(_gates_row(gate_target, shard, f"layer.{layer}.shared_expert_gate", (1, hidden), dtype_out))
    return rows


def build_rows(recipe: Recipe, base: Source, experts: list[Source], shared: list[Source], out: OutputFamily,
               dtype_out: str, tie_output: bool) -> list[dict[str, Any]]:
    """One row per output tensor (part), globals first, then layer by layer in template order."""
    rows: list[dict[str, Any]] = []
    g = base.family.globals
    rows.append(_row(out.globals["embed"], "globals", base, g["embed"].name, dtype_out))
    rows.append(_row(out.globals["final_norm"], "globals", base, g["final_norm"].name, dtype_out))
    if not tie_output:
        head = g["lm_head"] if base.params["untied"] else g["embed"]
        rows.append(_row(out.globals["lm_head"], "globals", base, head.name, dtype_out))
    hidden = base.params["hidden_size"]
    for layer in range(base.params["num_hidden_layers"]):
        shard = f"layer-{layer}"
        rows += _attention_rows(layer, shard, base, out, dtype_out)
        rows.append(_gates_row(out.layer_name(layer, out.router), shard, f"layer.{layer}.router",
                               (len(experts), hidden), dtype_out))
        for index, (spec_e, source) in enumerate(zip(recipe.experts, experts)):
            for role, out_name in out.experts.items():
                target = out.layer_name(layer, out_name, expert=index)
                rows.append(_row(target, shard, source, source.family.layer_name(layer, source.family.mlp[role]),
                                 dtype_out, _mlp_ops(spec_e, role, target, recipe.seed)))
        if out.shared_expert:
            rows += _shared_rows(layer, shard, recipe, shared, out, dtype_out, hidden)
    return rows


def validate_rows(rows: list[dict[str, Any]], num_layers: int) -> pd.DataFrame:
    """The pandera contract between validation and the shard jobs."""
    frame = pd.DataFrame(rows, columns=PLAN_COLUMNS)
    try:
        PLAN_SCHEMA.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as exc:
        raise ModelError(f"internal plan check failed: {exc.failure_cases.head(3).to_dict('records')}",
                         "plan.tensors.tsv", "please report this with your recipe") from None
    layers = {s for s in frame["shard"] if s != "globals"}
    if layers != {f"layer-{i}" for i in range(num_layers)}:
        raise ModelError("plan does not cover every layer", "plan.tensors.tsv", "please report this with your recipe")
    return frame


def _dtype_out(recipe: Recipe, base: Source, ctx: PlanContext) -> str:
    if recipe.dtype:
        ctx.decide(f"output dtype {recipe.dtype}", "the recipe's dtype")
        return SAFETENSORS_NAME[recipe.dtype]
    embed = base.inventory[base.family.globals["embed"].name]
    ctx.decide(f"output dtype {TORCH_NAME[embed.dtype]}", "the recipe gives no dtype: the base's weights' dtype")
    return embed.dtype


def _tie_output(recipe: Recipe, base: Source, ctx: PlanContext) -> bool:
    if not base.params["tied"]:
        return False
    if recipe.tie_word_embeddings == "untie":
        ctx.decide("write lm_head.weight as a copy of the embeddings (untied)",
                   "tie_word_embeddings: untie, for engines whose MoE classes ignore the tie")
        return False
    ctx.decide("keep tied embeddings (no lm_head on disk, tie_word_embeddings: true)",
               "the base ties its embeddings and the recipe keeps the tie")
    return True


def _source_entry(source: Source, roles: list[str]) -> dict[str, Any]:
    sj = source.source_json
    return {"ref": source.ref, "slug": source.slug, "roles": roles, "family": source.family.name,
            "model_type": source.params["model_type"], "kind": sj["kind"],
            "resolved_revision": sj["resolved_revision"]}


def make_plan(merge: str, recipe: Recipe, meta_dirs: Mapping[str, Path]) -> tuple[dict[str, Any], pd.DataFrame]:
    """Validate the recipe against its sources' metadata and build plan.json + the tensor table."""
    ctx = PlanContext()
    sources = {ref: load_source(ref, meta_dirs[ref]) for ref in recipe.source_models}
    base = sources[recipe.base_model]
    check_inventory(base)
    experts = [sources[e.source_model] for e in recipe.experts]
    shared = [sources[e.source_model] for e in recipe.shared_experts]
    for role, group in (("expert", experts), ("shared expert", shared)):
        for source in group:
            check_inventory(source, roles="mlp")
            check_against_base(base, source, role, recipe, ctx)
    out = output_family(recipe, base)
    if shared and not out.shared_expert:
        raise RecipeError(f"{out.name} has no shared experts, but the recipe lists {len(shared)}",
                          "recipe: shared_experts", "remove shared_experts or use architecture: qwen (Qwen2-MoE)")
    check_representable(base, experts + shared, out)
    dtype_out = _dtype_out(recipe, base, ctx)
    tie_output = _tie_output(recipe, base, ctx)
    num_layers = base.params["num_hidden_layers"]
    frame = validate_rows(build_rows(recipe, base, experts, shared, out, dtype_out, tie_output), num_layers)
    roles: dict[str, list[str]] = {}
    for ref, role in [(recipe.base_model, "base")] + [(e.source_model, f"expert:{e.name}") for e in recipe.experts] \
            + [(e.source_model, f"shared_expert:{e.name}") for e in recipe.shared_experts]:
        roles.setdefault(ref, []).append(role)
    plan = {
        "merge": merge,
        "recipe": recipe.to_dict(),
        "base": base.slug,
        "input_family": base.family.name,
        "output_family": out.name,
        "num_layers": num_layers,
        "num_experts": len(experts),
        "hidden_size": base.params["hidden_size"],
        "shared_intermediate_size": _shared_width(shared, out),
        "dtype_out": dtype_out,
        "tie_output": tie_output,
        "experts": [{"name": e.name, "slug": s.slug, "ref": e.source_model} for e, s in zip(recipe.experts, experts)],
        "shared_experts": [{"name": e.name, "slug": s.slug, "ref": e.source_model}
                           for e, s in zip(recipe.shared_experts, shared)],
        "sources": {s.slug: _source_entry(s, roles[s.ref]) for s in sources.values()},
        "base_params": base.params,
        "shards": ["globals"] + [f"layer-{i}" for i in range(num_layers)],
        "shard_bytes": _shard_bytes(frame),
        "decisions": ctx.decisions,
        "warnings": ctx.warnings,
    }
    return plan, frame


def _shared_width(shared: list[Source], out: OutputFamily) -> int | None:
    if not out.shared_expert:
        return None
    return sum(s.params["intermediate_size"] for s in shared) if shared else ZERO_SHARED_INTERMEDIATE


def _shard_bytes(frame: pd.DataFrame) -> dict[str, int]:
    """Output bytes per shard: the basis of each shard job's memory and time request."""
    sizes = frame.apply(lambda r: ITEMSIZE[r["dtype_out"]] * math.prod(_shape(r["shape"])), axis=1)
    return {shard: int(total) for shard, total in sizes.groupby(frame["shard"]).sum().items()}


def planned_shapes(frame: pd.DataFrame) -> dict[str, tuple[int, ...]]:
    """Output tensor name -> shape, with multi-part tensors concatenated along their dim."""
    parts: dict[str, list[dict[str, Any]]] = {}
    for row in frame.to_dict("records"):
        parts.setdefault(row["target_name"], []).append(row)
    return {name: tensor_shape(rows) for name, rows in parts.items()}


def write_plan(plan: Mapping[str, Any], frame: pd.DataFrame, plan_json: Path, plan_tsv: Path) -> None:
    write_text(plan_tsv, frame.to_csv(sep="\t", index=False))
    write_json(plan_json, plan)


