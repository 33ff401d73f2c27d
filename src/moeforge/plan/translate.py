"""Config translation: the output family's config.json from the base's, every decision recorded.

Two user-reported failures live here: a Llama with linear rope scaling turned into a Mixtral
whose runtime ignored the scaling (")))))"), and Mixtral's class default rope_theta (1e6)
silently replacing the base's. So rope is always written explicitly, in both the 4.x form
(top-level ``rope_theta``/``rope_scaling``) and the 5.x form (``rope_parameters``), and every
field's origin goes into translation.json.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from moeforge.errors import ModelError, RecipeError
from moeforge.io.fetch import REFETCH_FIX
from moeforge.io.files import read_json, write_json
from moeforge.io.model_config import checked_metadata
from moeforge.io.safetensors_file import TORCH_NAME
from moeforge.plan import templates as arch
from moeforge.plan.plan_json import Plan, read_plan
from moeforge.plan.window import window_config

#: Mean wrapped angle error (radians) above which a theta translation is reported as a warning;
#: random phases average pi/2, and any linear-scaling translation lands near 1 rad.
ANGLE_WARN_RAD = 0.05


def _rope_forms(theta: float, scaling: Mapping[str, Any] | None) -> dict[str, Any]:
    """Both config forms, so transformers 4.x and 5.x compute the same rotary embedding."""
    if scaling is None:
        return {"rope_theta": theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    legacy = {"type": scaling["rope_type"], **scaling}
    return {"rope_theta": theta, "rope_scaling": legacy, "rope_parameters": {**scaling, "rope_theta": theta}}


def theta_for(theta: float, scaling: Mapping[str, Any], head_dim: int) -> tuple[float, str]:
    """The static rope_theta that stands in for a scaling, with the formula used.

    No theta reproduces linear scaling (the highest-frequency pair always has frequency 1);
    the NTK-aware base b*s^(d/(d-2)) is the customary approximation and its error is measured
    by :func:`angle_error`. For dynamic NTK, a static theta at s times the original context
    is faithful where dynamic scaling would reach that length.
    """
    kind = scaling["rope_type"]
    factor = float(scaling.get("factor", 1.0))
    exponent = head_dim / (head_dim - 2)
    if kind == "linear":
        return theta * factor ** exponent, "theta * factor ** (head_dim / (head_dim - 2))"
    if kind == "dynamic":
        return theta * (factor ** 2 - factor + 1) ** exponent, \
            "theta * (factor**2 - factor + 1) ** (head_dim / (head_dim - 2))"
    raise RecipeError(f"rope scaling {kind!r} has no rope_theta equivalent (it changes frequencies unevenly"
                      f"{' and attention temperature' if kind in ('yarn', 'longrope') else ''})",
                      "recipe: rope_scaling", "use rope_scaling: preserve (the default) or drop")


def angle_error(theta: float, scaling: Mapping[str, Any], new_theta: float, head_dim: int,
                positions: int) -> dict[str, Any]:
    """Wrapped rotary angle error of a static `new_theta` against the source's rope, per pair.

    Against linear scaling the reference frequencies are theta^(-2i/d) / factor. Dynamic NTK
    leaves positions inside the original context unscaled, so there the reference is the plain
    theta^(-2i/d): the error is what a static theta costs on short inputs. Every position
    0..positions-1 is evaluated; the error is the angle difference wrapped to [-pi, pi].
    """
    import numpy as np

    factor = float(scaling.get("factor", 1.0)) if scaling["rope_type"] == "linear" else 1.0
    exponents = -2.0 * np.arange(head_dim // 2, dtype=np.float64) / head_dim
    delta = theta ** exponents / factor - new_theta ** exponents
    angles = np.arange(positions, dtype=np.float64)[:, None] * delta[None, :]
    errors = np.abs(np.remainder(angles + np.pi, 2 * np.pi) - np.pi)
    mean, peak = errors.mean(axis=0), errors.max(axis=0)
    bands = [{"pair": i, "mean_rad": round(float(m), 6), "max_rad": round(float(x), 6)}
             for i, (m, x) in enumerate(zip(mean, peak))]
    return {"positions": positions, "mean_rad": round(float(errors.mean()), 6),
            "max_rad": round(float(errors.max()), 6), "bands": bands}


def _rope(plan: Plan, decisions: list[dict[str, Any]]) -> dict[str, Any]:
    p = plan.base_params
    rope, mode = p["rope"], plan.recipe.rope_scaling
    theta, scaling = rope["theta"], rope["scaling"]
    if scaling is None:
        decisions.append({"field": "rope_theta", "value": theta,
                          "why": "the base's theta, written explicitly (Mixtral's class default is 1e6)"})
        return _rope_forms(theta, None)
    if mode == "preserve":
        decisions.append({"field": "rope_scaling", "value": scaling,
                          "why": "preserve: the base's scaling in both the 4.x and 5.x config forms"})
        return _rope_forms(theta, scaling)
    if mode == "drop":
        decisions.append({"field": "rope_scaling", "value": None,
                          "why": "drop: scaling removed at the recipe's request; long-context quality changes"})
        return _rope_forms(theta, None)
    new_theta, formula = theta_for(theta, scaling, p["head_dim"])
    context = int(p.get("max_position_embeddings") or 4096)
    error = angle_error(theta, scaling, new_theta, p["head_dim"], context)
    warning = (f"rope_scaling: theta replaces {scaling['rope_type']} scaling x{scaling.get('factor')} by "
               f"rope_theta={new_theta:.6g}; mean rotary angle error {error['mean_rad']:.3f} rad (max "
               f"{error['max_rad']:.3f}) over {context} positions: attention will not match the base exactly, "
               f"so check the smoke test's comparison with the base")
    decisions.append({"field": "rope_theta", "value": new_theta, "why": "theta: scaling translated to a static base",
                      "formula": formula, "inputs": {"theta": theta, "scaling": scaling, "head_dim": p["head_dim"]},
                      "angle_error": error, **({"warning": warning} if error["mean_rad"] > ANGLE_WARN_RAD else {})})
    return _rope_forms(new_theta, None)


def build_config(plan: Plan, base_config: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """config.json for the output family, and the decisions that made it."""
    out = arch.output_family_for(plan.output_family)
    p = plan.base_params
    recipe = plan.recipe
    decisions: list[dict[str, Any]] = []
    config: dict[str, Any] = {"architectures": list(out.architectures), "model_type": out.model_type}
    for key in out.config["copy"]:
        value = p[key] if key in p else base_config.get(key)
        if value is not None:
            config[key] = value
    decisions.append({"field": "copied", "value": sorted(k for k in out.config["copy"] if k in config),
                      "why": "taken from the base (normalised: head_dim and kv heads always explicit)"})
    for key in out.config.get("experts_key", ()):
        config[key] = plan.num_experts
    values = {**p, "shared_intermediate_size": plan.shared_intermediate_size}
    for key, param in out.config.get("params", {}).items():
        config[key] = values[param]
        decisions.append({"field": key, "value": values[param], "why": f"from {param}"})
    config["num_experts_per_tok"] = recipe.experts_per_token
    config.update(out.config["set"])
    config.update(_rope(plan, decisions))
    config["sliding_window"] = recipe.sliding_window
    if "use_sliding_window" in config:
        config["use_sliding_window"] = recipe.sliding_window is not None
    config.update(window_config(out.window_layers, list(plan.window_layers), p["num_hidden_layers"]))
    decisions.append({"field": "sliding_window", "value": recipe.sliding_window,
                      "why": "the recipe's sliding_window" if recipe.sliding_window else
                      f"null: full attention (the base's window was {p['sliding_window']})"})
    config["tie_word_embeddings"] = bool(plan.tie_output)
    dtype = TORCH_NAME[plan.dtype_out]
    config["dtype"] = dtype
    config["torch_dtype"] = dtype
    decisions.append({"field": "dtype", "value": dtype,
                      "why": "written as both dtype (5.x) and torch_dtype (4.x)"})
    return config, decisions


def generation_config(base_meta: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """The base's generation_config.json, or a minimal one from the config's special tokens."""
    path = base_meta / "generation_config.json"
    if path.is_file():
        return checked_metadata(read_json(path, "the base model", ModelError, REFETCH_FIX), path.name,
                                f"the base model ({path})")
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}


def read_base_config(base_meta: Path) -> dict[str, Any]:
    """The base's config.json as fetched, checked like every fetched config."""
    return checked_metadata(read_json(base_meta / "config.json", "the base model", ModelError, REFETCH_FIX),
                            "config.json", f"the base model ({base_meta / 'config.json'})")


def translate(plan_json: Path, base_meta: Path, out_dir: Path) -> dict[str, Any]:
    """Write config.json, generation_config.json and translation.json into out_dir; log each decision's warning.

    ``build_config`` itself logs nothing: the workflow also computes the config while it plans the jobs (the
    class check is named by it), and a warning belongs to this step's log, once."""
    plan = read_plan(plan_json)
    config, decisions = build_config(plan, read_base_config(base_meta))
    for decision in decisions:
        if "warning" in decision:
            logging.getLogger("moeforge").warning("%s", decision["warning"])
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", generation_config(base_meta, config))
    write_json(out_dir / "translation.json", {"output_family": plan.output_family, "decisions": decisions,
                                              "warnings": [d["warning"] for d in decisions if "warning" in d]})
    return config
