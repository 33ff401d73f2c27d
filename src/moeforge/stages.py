"""Plan-driven entry points of the gates and smoke-test rules.

The gate and smoke libraries take explicit options; these adapters derive those options
from plan.json (the single truth), so the Snakemake scripts stay one call each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from moeforge.safetensors_io import TORCH_NAME


def _weights_dir(weights_json: Path) -> Path:
    return Path(json.loads(weights_json.read_text())["dir"])


def gate_spec(plan: Mapping[str, Any]) -> Any:
    """The GateSpec a plan's recipe asks for."""
    from moeforge.gatespec import ExpertPrompts, GateSpec

    recipe = plan["recipe"]

    def prompts(items: list[Mapping[str, Any]]) -> tuple[Any, ...]:
        return tuple(ExpertPrompts(e["name"], tuple(e["positive_prompts"]), tuple(e["negative_prompts"]))
                     for e in items)

    shared: tuple[Any, ...] = ()
    if recipe["shared_experts"] and recipe["shared_gate"] == "prompts":
        # The N shared experts become one fused shared MLP with one gate, routed by all their prompts.
        group = prompts(recipe["shared_experts"])
        shared = (ExpertPrompts("shared", tuple(p for g in group for p in g.positive),
                                tuple(p for g in group for p in g.negative)),)
    return GateSpec(mode=recipe["gate_mode"], experts=prompts(recipe["experts"]), shared_experts=shared,
                    seed=recipe["seed"], token_reduction=recipe["token_reduction"],
                    prompt_template=recipe["prompt_template"], router_scale=recipe["router_scale"],
                    batch_size=recipe["gate_batch_size"], device=recipe["gate_device"],
                    strict_gates=recipe["strict_gates"])


def gates_for_plan(plan_json: Path, base_weights: Path, out_tensors: Path, out_stats: Path, threads: int = 1) -> None:
    import torch

    from moeforge.gates import compute_gates, write_gates

    torch.set_num_threads(max(1, threads))
    plan = json.loads(plan_json.read_text())
    tensors, stats = compute_gates(_weights_dir(base_weights), gate_spec(plan), progress=False)
    # Stored in the output dtype, so shard jobs copy router bytes as they are (no torch there);
    # gates.json's statistics are computed in float32 before this cast.
    dtype = getattr(torch, TORCH_NAME[plan["dtype_out"]])
    write_gates({name: t.to(dtype) for name, t in tensors.items()}, stats, out_tensors, out_stats)


def is_identity_build(plan: Mapping[str, Any]) -> bool:
    """Every expert is the base, unmodified: the MoE must then compute exactly the base model."""
    recipe = plan["recipe"]
    rope_changed = plan["base_params"]["rope"]["scaling"] is not None and recipe["rope_scaling"] != "preserve"
    unmodified = all(e["source_model"] == recipe["base_model"] and not e["noise_scale"]
                     and e["residual_scale"] in (None, 1.0) for e in recipe["experts"])
    return unmodified and not rope_changed and not recipe["shared_experts"]


#: Above this float32 footprint the smoke test runs in the model's own dtype ("auto").
FLOAT32_SMOKE_LIMIT = 8 << 30


def smoke_dtype(plan: Mapping[str, Any], requested: str) -> str:
    """float32 when it fits comfortably (exact identity check), else the model's 16-bit dtype."""
    if requested != "auto":
        return requested
    from moeforge.safetensors_io import ITEMSIZE, TORCH_NAME

    size = sum(plan["shard_bytes"].values())
    itemsize = ITEMSIZE[plan["dtype_out"]]
    return "float32" if size * 4 // itemsize <= FLOAT32_SMOKE_LIMIT else TORCH_NAME[plan["dtype_out"]]


def smoke_options(plan: Mapping[str, Any], device: str, max_new_tokens: int, dtype: str = "auto") -> Any:
    from moeforge.smoke import SmokeOptions

    recipe = plan["recipe"]
    expert_prompts = {e["name"]: list(e["positive_prompts"]) for e in recipe["experts"]}
    prompts = list(recipe["smoke_prompts"]) or [p for ps in expert_prompts.values() for p in ps] \
        or ["The quick brown fox", "Once upon a time"]
    return SmokeOptions(prompts=prompts, max_new_tokens=recipe["max_new_tokens"] or max_new_tokens,
                        device=device, identity=is_identity_build(plan), dtype=smoke_dtype(plan, dtype),
                        expert_prompts={k: v for k, v in expert_prompts.items() if v},
                        expert_names=[e["name"] for e in recipe["experts"]])


def smoke_stage(model_dir: Path, plan_json: Path, gates_json: Path, translation_json: Path, base_weights: Path, *,
                device: str, dtype: str = "auto",
                max_new_tokens: int, out_json: Path, out_md: Path, load_png: Path, similarity_png: Path) -> dict:
    from moeforge.plots import plot_expert_load, plot_gate_similarity
    from moeforge.smoke import run_smoke, write_report

    plan = json.loads(plan_json.read_text())
    report = run_smoke(model_dir, _weights_dir(base_weights), smoke_options(plan, device, max_new_tokens, dtype))
    translation = json.loads(translation_json.read_text())
    report["build"] = {"merge": plan["merge"], "output_family": plan["output_family"],
                       "warnings": plan["warnings"], "decisions": plan["decisions"],
                       "translation": translation["decisions"],
                       "trust_remote_code": plan["recipe"]["trust_remote_code"]}
    report["warnings"] = list(report["warnings"]) + translation["warnings"]
    write_report(report, out_json, out_md)
    plot_expert_load(report, load_png)
    plot_gate_similarity(json.loads(gates_json.read_text()), similarity_png)
    return report
