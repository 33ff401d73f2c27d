"""The plan rows: one per output tensor (part), built from templates and checked by pandera.

Shard jobs execute these rows and know nothing about architectures, so Mixtral, Qwen2-MoE and
Qwen3-MoE differ only in templates and in the rows built here.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pandas as pd
import pandera.pandas as pa

from moeforge.errors import ModelError
from moeforge.io.safetensors_file import ITEMSIZE, shape_of
from moeforge.plan import templates as arch
from moeforge.plan.recipe import ExpertSpec, Recipe
from moeforge.plan.sources import FLOAT_DTYPES, Source
from moeforge.plan.table import GATES_SOURCE, PLAN_COLUMNS, ROUTERS_SHARD, ZEROS_SOURCE, routers_file, scale_ref
from moeforge.plan.templates import OutputFamily

#: Width of the all-zero shared expert written when a Qwen2-MoE recipe has none: small, and
#: divisible by every usual tensor-parallel degree (engines shard this dimension).
ZERO_SHARED_INTERMEDIATE = 128

#: Consecutive decoder layers share a shard (one job, one output file) while it stays under this
#: size. Each job costs an interpreter start and the scheduler's bookkeeping (on a cluster, a queue
#: wait too), which dominated builds of small models when every layer was its own job; a 7B-class
#: layer (about 1.4 GB with four experts) is still one job, so large merges keep their parallelism.
SHARD_TARGET_BYTES = 1 << 30

_OP = r"(cast|zeros|scale:[-0-9.e+]+|noise:[0-9.e+-]+@\d+)"


PLAN_SCHEMA = pa.DataFrameSchema(
    {
        "target_name": pa.Column(str),
        "part": pa.Column(int, pa.Check.ge(0)),
        "concat_dim": pa.Column(int, pa.Check.isin([0, 1])),
        "shard": pa.Column(str, pa.Check.str_matches(r"^(globals|layer-\d+)$")),  # one per layer here; group_shards merges them
        "source": pa.Column(str, pa.Check.str_length(min_value=1)),
        "source_name": pa.Column(str),
        "source_file": pa.Column(str),
        "dtype_in": pa.Column(str, pa.Check.isin(FLOAT_DTYPES)),
        "dtype_out": pa.Column(str, pa.Check.isin(FLOAT_DTYPES)),
        "shape": pa.Column(str, pa.Check.str_matches(r"^\d+(,\d+)*$")),
        "transform": pa.Column(str, pa.Check.str_matches(rf"^(copy|{_OP}(;{_OP})*)$")),
        "scale_ref": pa.Column(str),
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


def _noise_seed(seed: int, target: str) -> int:
    """A per-tensor seed: results do not depend on which job or order computes them."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{target}".encode()).digest()[:7], "little")


def _transform(dtype_in: str, dtype_out: str, ops: list[str]) -> str:
    steps = list(ops)
    if dtype_in != dtype_out and not steps:
        steps.append("cast")
    return ";".join(steps) or "copy"


def _row(target: str, shard: str, source: Source, name: str, dtype_out: str, ops: list[str] = (),
         part: int = 0, concat_dim: int = 0, reference: str = "") -> dict[str, Any]:
    entry = source.inventory[name]
    return {"target_name": target, "part": part, "concat_dim": concat_dim, "shard": shard, "source": source.slug,
            "source_name": name, "source_file": entry.file, "dtype_in": entry.dtype, "dtype_out": dtype_out,
            "shape": ",".join(map(str, entry.shape)), "transform": _transform(entry.dtype, dtype_out, list(ops)),
            "scale_ref": reference}


def _base_counterpart(base: Source, source: Source, layer: int, role: str) -> str:
    """The ``scale_ref`` of an expert's MLP matrix: the base's same-role matrix of that layer, whose scale the
    shard job compares with the expert's (a relabelled dtype makes an expert orders of magnitude off). Empty
    for the base's own matrices: they are their own counterpart."""
    name = base.family.layer_name(layer, base.family.mlp[role])
    if source.slug == base.slug or name not in base.inventory:
        return ""
    return scale_ref(base.slug, base.inventory[name].file, name)


def _zeros_row(target: str, shard: str, shape: tuple[int, ...], dtype_out: str) -> dict[str, Any]:
    return {"target_name": target, "part": 0, "concat_dim": 0, "shard": shard, "source": ZEROS_SOURCE,
            "source_name": "", "source_file": "", "dtype_in": dtype_out, "dtype_out": dtype_out,
            "shape": ",".join(map(str, shape)), "transform": "zeros", "scale_ref": ""}


def _gates_row(target: str, shard: str, name: str, shape: tuple[int, ...], dtype_out: str,
               recipe: Recipe) -> dict[str, Any]:
    # The gates rule (and router training) write routers in the output dtype: these rows are plain byte copies.
    return {"target_name": target, "part": 0, "concat_dim": 0, "shard": shard, "source": GATES_SOURCE,
            "source_name": name, "source_file": routers_file(recipe.router_training is not None),
            "dtype_in": dtype_out, "dtype_out": dtype_out,
            "shape": ",".join(map(str, shape)), "transform": "copy", "scale_ref": ""}


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


def _shared_rows(layer: int, shard: str, recipe: Recipe, base: Source, shared: list[Source], out: OutputFamily,
                 dtype_out: str, hidden: int) -> list[dict[str, Any]]:
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
                             concat_dim=1 if role == "down_proj" else 0,
                             reference=_base_counterpart(base, source, layer, role)))
    if always:
        rows.append(_zeros_row(gate_target, shard, (1, hidden), dtype_out))
    else:
        rows.append(_gates_row(gate_target, shard, f"layer.{layer}.shared_expert_gate", (1, hidden), dtype_out,
                               recipe))
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
                               (len(experts), hidden), dtype_out, recipe))
        for index, (spec_e, source) in enumerate(zip(recipe.experts, experts)):
            for role, out_name in out.experts.items():
                target = out.layer_name(layer, out_name, expert=index)
                rows.append(_row(target, shard, source, source.family.layer_name(layer, source.family.mlp[role]),
                                 dtype_out, _mlp_ops(spec_e, role, target, recipe.seed),
                                 reference=_base_counterpart(base, source, layer, role)))
        if out.shared_expert:
            rows += _shared_rows(layer, shard, recipe, base, shared, out, dtype_out, hidden)
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


def row_bytes(frame: pd.DataFrame) -> pd.Series:
    """Output bytes of every row."""
    return frame.apply(lambda r: ITEMSIZE[r["dtype_out"]] * math.prod(shape_of(r["shape"])), axis=1)


def layer_bytes(frame: pd.DataFrame) -> dict[str, int]:
    """Output bytes of each decoder layer (``layer-i``, as validate_rows checked them)."""
    layers = frame[frame["shard"] != "globals"]
    return {shard: int(total) for shard, total in row_bytes(layers).groupby(layers["shard"], sort=False).sum().items()}


def _layer_groups(num_layers: int, total_bytes: int) -> list[range]:
    """As few runs of consecutive layers as keep each under SHARD_TARGET_BYTES, of near-equal length."""
    count = min(num_layers, max(1, math.ceil(total_bytes / SHARD_TARGET_BYTES)))
    size, extra = divmod(num_layers, count)
    groups, start = [], 0
    for index in range(count):
        stop = start + size + (index < extra)
        groups.append(range(start, stop))
        start = stop
    return groups


def group_shards(frame: pd.DataFrame, num_layers: int) -> tuple[pd.DataFrame, list[str]]:
    """Each row's final shard, and the shards in file order: globals, the layer groups, the routers."""
    groups = _layer_groups(num_layers, sum(layer_bytes(frame).values()))
    names = {f"layer-{i}": f"layers-{g.start}-{g.stop - 1}" for g in groups for i in g}
    shard = frame["shard"].map(lambda s: names.get(s, s)).where(frame["source"] != GATES_SOURCE, ROUTERS_SHARD)
    shards = ["globals", *(f"layers-{g.start}-{g.stop - 1}" for g in groups), ROUTERS_SHARD]
    return frame.assign(shard=shard), shards
