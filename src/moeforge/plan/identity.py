"""Whether a plan builds the base model again: every expert the base, unmodified.

Such a build must compute exactly what the base computes, which the smoke test checks; that check
is exact only in float32, so it also decides the smoke test's dtype (see moeforge.resources).
"""

from __future__ import annotations

from moeforge.plan.plan_json import Plan
from moeforge.plan.recipe import Recipe
from moeforge.plan.window import window_differs


def is_identity_build(plan: Plan) -> bool:
    """Every expert is the base, unmodified, under the base's rope and sliding window: the MoE must then compute
    exactly the base model."""
    return _every_expert_is_the_base(plan.recipe) and not _attention_changes(plan)


def identity_skipped_warning(plan: Plan) -> str | None:
    """What to say when every expert is the base but the attention changes, so the exact check cannot apply."""
    changes = _attention_changes(plan)
    if not _every_expert_is_the_base(plan.recipe) or not changes:
        return None
    return (f"every expert is the base model, but {' and '.join(changes)}: the smoke test compares the merge with the "
            "base (KL, top-1 agreement) instead of requiring it to reproduce the base exactly")


def _every_expert_is_the_base(recipe: Recipe) -> bool:
    """Every routed expert is the base with no noise or scaling, and there are no shared experts."""
    return not recipe.shared_experts and all(
        e.source_model == recipe.base_model and not e.noise_scale and e.residual_scale in (None, 1.0)
        for e in recipe.experts)


def _attention_changes(plan: Plan) -> list[str]:
    """How the output's attention departs from the base's (rope scaling not preserved, another sliding window)."""
    recipe, params = plan.recipe, plan.base_params
    changes = []
    if params["rope"]["scaling"] is not None and recipe.rope_scaling != "preserve":
        changes.append(f"rope_scaling: {recipe.rope_scaling} changes the base's rope")
    if window_differs(params, recipe.sliding_window, list(plan.window_layers)):
        changes.append("the output's sliding window differs from the base's")
    return changes
