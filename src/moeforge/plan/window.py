"""Which decoder layers attend within a sliding window, in the base and in the output.

Families spell the window differently: Mistral applies ``sliding_window`` to every layer; Qwen2
and Qwen3 only from layer ``max_window_layers`` on, and only with ``use_sliding_window``; configs
saved by transformers 5.x list ``layer_types``. Output classes differ too: transformers 5.x's
Qwen2-MoE derives its own (alternating) pattern from ``max_window_layers`` unless ``layer_types``
is written out, and 4.x's masks every layer. A window put in the wrong layers loads without
complaint and computes something else, so the pattern is decided here, from the templates'
``window_layers`` style, refused when no output can express it, and reported when it differs from
the base's.
"""

from __future__ import annotations

from typing import Any, Mapping

from moeforge.errors import RecipeError

#: transformers' Qwen2/Qwen3 class default, which applies when a config omits ``max_window_layers``.
MAX_WINDOW_LAYERS_DEFAULT = 28


def window_layers_of(config: Mapping[str, Any], style: str, num_layers: int, window: int | None) -> list[int]:
    """The base's layers that attend within its window (``window`` is the effective one; none: no layer)."""
    if window is None:
        return []
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    if style == "from_max_window_layers":
        first = config.get("max_window_layers")
        return list(range(MAX_WINDOW_LAYERS_DEFAULT if first is None else int(first), num_layers))
    return list(range(num_layers))


def output_window_layers(window: int | None, base_params: Mapping[str, Any], family: str) -> list[int]:
    """The output's window layers: none without a window, else every layer.

    Every MoE class applies a window to every layer in transformers 4.x (Qwen2-MoE builds one causal mask
    for all of them, whatever ``max_window_layers`` says), so a base whose window starts at a later layer
    has no output that computes what it computes in both versions, and is refused.
    """
    num_layers = base_params["num_hidden_layers"]
    if window is None:
        return []
    layers = list(base_params["window_layers"]) or list(range(num_layers))
    if layers != list(range(num_layers)):
        raise RecipeError(
            f"the base attends within its sliding window in layers {_describe(layers, num_layers)} only, and a "
            f"{family} output applies a window to every layer (in transformers 4.x): the merged model would attend "
            "differently from the base", "recipe: sliding_window",
            "set sliding_window: null (full attention in every layer)")
    return layers


def window_differs(base_params: Mapping[str, Any], window: int | None, layers: list[int]) -> bool:
    """Whether the output attends differently from the base on long enough inputs."""
    return (window, list(layers)) != (base_params["sliding_window"], list(base_params.get("window_layers", [])))


def window_warning(base_ref: str, base_params: Mapping[str, Any], window: int | None) -> str:
    """Why the output computes differently from the base on inputs longer than a window, and the recipe key to change."""
    base_window = base_params["sliding_window"]
    if window is None:
        return (f"the base {base_ref} attends within a sliding window of {base_window} tokens, the output to the whole "
                f"context (sliding_window: null, the default): on inputs longer than {base_window} tokens it computes "
                f"differently from the base and its experts; set sliding_window: {base_window} to keep the base's window")
    if base_window is None:
        return (f"the output attends within a sliding window of {window} tokens (sliding_window: {window}), the base "
                f"{base_ref} to the whole context: on inputs longer than {window} tokens it computes differently from "
                "the base; remove sliding_window to keep full attention")
    return (f"the output's sliding window of {window} tokens differs from the base {base_ref}'s {base_window}: on inputs "
            f"longer than {min(window, base_window)} tokens it computes differently from the base; set sliding_window: "
            f"{base_window} to keep the base's window")


def window_config(style: str, layers: list[int], num_layers: int) -> dict[str, Any]:
    """The config keys that place the window in ``layers`` for a family of this style, in transformers 4.x and 5.x.

    ``from_max_window_layers``: 4.x's flash attention reads ``max_window_layers`` (the first window layer);
    5.x's Qwen2-MoE would derive an alternating pattern from it, so ``layer_types`` is written out as well.
    """
    if style != "from_max_window_layers" or not layers:
        return {}
    return {"max_window_layers": layers[0],
            "layer_types": ["sliding_attention" if i in layers else "full_attention" for i in range(num_layers)]}


def _describe(layers: list[int], num_layers: int) -> str:
    """Layer indices, as ranges where they run on (``0-3, 8``), of ``num_layers``."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return f"{text} (of 0-{num_layers - 1})"
