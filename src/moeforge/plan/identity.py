"""Whether a plan builds the base model again: every expert the base, unmodified.

Such a build must compute exactly what the base computes, which the smoke test checks; that check
is exact only in float32, so it also decides the smoke test's dtype (see moeforge.resources).
"""

from __future__ import annotations

from typing import Any, Mapping

from moeforge.plan.window import window_differs


def is_identity_build(plan: Mapping[str, Any]) -> bool:
    """Every expert is the base, unmodified, under the base's rope and sliding window: the MoE must then compute
    exactly the base model."""
    recipe = plan["recipe"]
    rope_changed = plan["base_params"]["rope"]["scaling"] is not None and recipe["rope_scaling"] != "preserve"
    unmodified = all(e["source_model"] == recipe["base_model"] and not e["noise_scale"]
                     and e["residual_scale"] in (None, 1.0) for e in recipe["experts"])
    window_changed = window_differs(plan["base_params"], recipe["sliding_window"], plan.get("window_layers", []))
    return unmodified and not rope_changed and not window_changed and not recipe["shared_experts"]
