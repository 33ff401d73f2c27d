"""The merge plan: recipe + sources' metadata -> plan.json and the tensor table.

The single truth every later stage executes. Everything is decided from metadata (config.json,
tokenizer files, safetensors headers) before any weight is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd

from moeforge.errors import ModelError, RecipeError
from moeforge.io.files import write_text
from moeforge.io.safetensors_file import SAFETENSORS_NAME, TORCH_NAME
from moeforge.plan.identity import identity_skipped_warning
from moeforge.plan.plan_json import Plan, PlannedExpert, PlannedSource, write_plan_json
from moeforge.plan.recipe import Recipe
from moeforge.plan.rows import (
    ZERO_SHARED_INTERMEDIATE,
    build_rows,
    group_shards,
    layer_bytes,
    row_bytes,
    validate_rows,
)
from moeforge.plan.shard_keys import shard_keys
from moeforge.plan.sources import (
    PlanContext,
    Source,
    check_against_base,
    check_inventory,
    check_representable,
    load_source,
    output_family,
)
from moeforge.plan.templates import OutputFamily
from moeforge.plan.window import output_window_layers, window_differs, window_warning


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


def _source_entry(source: Source, roles: list[str]) -> PlannedSource:
    sj = source.source_json
    if "content_id" not in sj:
        raise ModelError("fetched by an older moeforge: its source.json has no content_id", str(source.meta_dir),
                         "delete that directory and rerun: fetch_metadata writes it again")
    return PlannedSource(ref=source.ref, slug=source.slug, roles=tuple(roles), family=source.family.name,
                         model_type=source.params["model_type"], kind=sj["kind"],
                         resolved_revision=sj["resolved_revision"], content_id=sj["content_id"])


def make_plan(merge: str, recipe: Recipe, meta_dirs: Mapping[str, Path]) -> tuple[Plan, pd.DataFrame]:
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
    for ref, source in sources.items():  # what fetching found (an index naming a missing shard)
        role = "base model" if ref == recipe.base_model else "expert"
        ctx.warnings += [f"{role} {ref}: {w}" for w in source.source_json.get("warnings", [])]
    if len(experts) == 1:
        ctx.warnings.append(f"the merge has one expert ({recipe.experts[0].name}): every token goes to it, so the "
                            "result computes that dense model with the base's attention; a router needs two or more")
    out = output_family(recipe, base)
    if shared and not out.shared_expert:
        raise RecipeError(f"{out.name} has no shared experts, but the recipe lists {len(shared)}",
                          "recipe: shared_experts", "remove shared_experts or use architecture: qwen (Qwen2-MoE)")
    check_representable(base, experts + shared, out)
    window_layers = output_window_layers(recipe.sliding_window, base.params, out.name)
    if window_differs(base.params, recipe.sliding_window, window_layers):
        ctx.warnings.append(window_warning(base.ref, base.params, recipe.sliding_window))
    dtype_out = _dtype_out(recipe, base, ctx)
    tie_output = _tie_output(recipe, base, ctx)
    num_layers = base.params["num_hidden_layers"]
    frame = validate_rows(build_rows(recipe, base, experts, shared, out, dtype_out, tie_output), num_layers)
    largest_layer = max(layer_bytes(frame).values())
    frame, shards = group_shards(frame, num_layers)
    roles: dict[str, list[str]] = {}
    for ref, role in [(recipe.base_model, "base")] + [(e.source_model, f"expert:{e.name}") for e in recipe.experts] \
            + [(e.source_model, f"shared_expert:{e.name}") for e in recipe.shared_experts]:
        roles.setdefault(ref, []).append(role)
    plan = Plan(
        merge=merge,
        recipe=recipe,
        base=base.slug,
        input_family=base.family.name,
        output_family=out.name,
        num_layers=num_layers,
        num_experts=len(experts),
        hidden_size=base.params["hidden_size"],
        shared_intermediate_size=_shared_width(shared, out),
        dtype_out=dtype_out,
        tie_output=tie_output,
        experts=tuple(PlannedExpert(e.name, s.slug, e.source_model) for e, s in zip(recipe.experts, experts)),
        shared_experts=tuple(PlannedExpert(e.name, s.slug, e.source_model)
                             for e, s in zip(recipe.shared_experts, shared)),
        sources={s.slug: _source_entry(s, roles[s.ref]) for s in sources.values()},
        base_params=base.params,
        window_layers=tuple(window_layers),
        shards=tuple(shards),
        shard_keys=shard_keys(frame.to_csv(sep="\t", index=False),
                              {s.slug: s.source_json["content_id"] for s in sources.values()}),
        shard_bytes=_shard_bytes(frame),
        layer_bytes=largest_layer,
        decisions=tuple(ctx.decisions),
        warnings=tuple(ctx.warnings),
    )
    skipped = identity_skipped_warning(plan)
    if skipped:
        plan = plan.with_warnings([skipped])
    return plan, frame


def _shared_width(shared: list[Source], out: OutputFamily) -> int | None:
    if not out.shared_expert:
        return None
    return sum(s.params["intermediate_size"] for s in shared) if shared else ZERO_SHARED_INTERMEDIATE


def _shard_bytes(frame: pd.DataFrame) -> dict[str, int]:
    """Output bytes per shard: the basis of each shard job's memory and time request."""
    return {shard: int(total) for shard, total in row_bytes(frame).groupby(frame["shard"]).sum().items()}


def write_plan(plan: Plan, frame: pd.DataFrame, plan_json: Path, plan_tsv: Path) -> None:
    write_text(plan_tsv, frame.to_csv(sep="\t", index=False))
    write_plan_json(plan, plan_json)


