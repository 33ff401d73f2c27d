"""Normalised model parameters: one vocabulary over config.json's many spellings.

config.json files differ by transformers version and family: 4.x writes ``rope_theta`` +
``rope_scaling`` (with ``type`` or ``rope_type``) and ``torch_dtype``; 5.x writes
``rope_parameters`` and ``dtype``; Qwen2 has q/k/v biases with no flag; head_dim is often
implied. Validation and translation compare and emit these normalised values only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from moeforge.errors import ModelError
from moeforge.io.fetch import REFETCH_FIX
from moeforge.io.files import read_json
from moeforge.io.model_config import checked_metadata
from moeforge.plan import templates as arch
from moeforge.plan.templates import INTEGER_PARAMS, InputFamily
from moeforge.plan.window import window_layers_of

REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def read_params(ref: str, meta_dir: Path) -> tuple[dict[str, Any], InputFamily, dict[str, Any]]:
    """A fetched source's config.json, its architecture family (by model_type) and normalised parameters."""
    where = f"model {ref} (config.json)"
    config = checked_metadata(read_json(meta_dir / "config.json", f"model {ref}", ModelError, REFETCH_FIX),
                              "config.json", where)
    model_type = config.get("model_type")
    if not model_type:
        raise ModelError("config.json has no model_type", where, "is this a transformers causal LM?")
    family = arch.input_family_for(model_type, where)
    return config, family, normalise(config, family, where)


def rope_of(config: Mapping[str, Any], default_theta: float) -> dict[str, Any]:
    """{"theta": float, "scaling": dict | None} from either config form.

    The scaling dict is normalised to use ``rope_type`` and carries every other field
    (factor, original_max_position_embeddings, ...) unchanged.
    """
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        theta = params.get("rope_theta", config.get("rope_theta", default_theta))
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        rope_type = rest.pop("rope_type", rest.pop("type", "default"))
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **rest}
        return {"theta": float(theta), "scaling": scaling}
    theta = config.get("rope_theta", default_theta)
    legacy = config.get("rope_scaling")
    scaling = None
    if isinstance(legacy, Mapping):
        rest = dict(legacy)
        rope_type = rest.pop("rope_type", None) or rest.pop("type", None) or "default"
        rest.pop("type", None)
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **rest}
    return {"theta": float(theta), "scaling": scaling}


def dtype_of(config: Mapping[str, Any]) -> str | None:
    value = config.get("dtype", config.get("torch_dtype"))
    return str(value).replace("torch.", "") if value is not None else None


def sliding_window_of(config: Mapping[str, Any]) -> int | None:
    """The effective window: Qwen2 configs carry a window that is off unless use_sliding_window."""
    if config.get("use_sliding_window") is False:
        return None
    value = config.get("sliding_window")
    return int(value) if value else None


def normalise(config: Mapping[str, Any], family: InputFamily, where: str) -> dict[str, Any]:
    """The normalised parameters of one model's config.json under its family."""
    missing = [k for k in REQUIRED if config.get(k) is None]
    if missing:
        raise ModelError(f"config.json lacks {', '.join(missing)}", where,
                         "the config is incomplete or not a decoder-only language model config")
    p: dict[str, Any] = dict(family.defaults)
    for key in INTEGER_PARAMS:
        if config.get(key) is not None:
            p[key] = int(config[key])
    p.setdefault("num_key_value_heads", p["num_attention_heads"])
    if config.get("head_dim") is None:
        p["head_dim"] = p["hidden_size"] // p["num_attention_heads"]
    for key in ("attention_bias", "mlp_bias"):
        if key in config:
            p[key] = bool(config[key])
    p["tied"] = bool(config.get("tie_word_embeddings", False))
    p["untied"] = not p["tied"]
    p["hidden_act"] = config.get("hidden_act", config.get("hidden_activation", "silu"))
    p["rms_norm_eps"] = float(config.get("rms_norm_eps", 1e-6))
    p["rope"] = rope_of(config, float(family.defaults.get("rope_theta", 10000.0)))
    p["max_position_embeddings"] = config.get("max_position_embeddings")
    p["sliding_window"] = sliding_window_of(config)
    p["window_layers"] = window_layers_of(config, family.window_layers, p["num_hidden_layers"], p["sliding_window"])
    p["dtype"] = dtype_of(config)
    p["model_type"] = config.get("model_type")
    return p
