"""Gate keys: the gates are named after what they are computed from, not after the merge that asked for them.

The gates are the base model's response to the experts' prompts (or seeded noise, or its embedding table):
nothing in them depends on how many experts a token takes, on router training (which starts from them), on
the smoke test's prompts or on how the output config translates rope, sliding window or tied embeddings. So
search candidates that vary those keys (``experts_per_token`` above all) share one gates job and one file,
as they share the expert shards. At 1B-class sizes a gates job is a forward pass of the base over every prompt.

The key hashes the recipe *less* the keys listed here, with the base named by its content id (its bytes, not
its path), the output dtype the gates are stored in and the thread count they are summed with. A recipe key
added later is in the key until it is listed here, so it can only split work, never share a stale file. The
gates job computes from ``gates_recipe`` of the same settings, the listed keys at their defaults: a key that
is not in the hash cannot reach the computation either.
"""

from __future__ import annotations

from typing import Any

from moeforge.io.files import json_sha256
from moeforge.plan.plan_json import Plan
from moeforge.plan.recipe import Recipe
from moeforge.resources import gates_threads

#: Recipe keys the gates do not read: left out of the key, at their defaults in the recipe the job computes from.
NOT_READ = ("experts_per_token", "router_training", "smoke_prompts", "max_new_tokens", "rope_scaling",
            "allow_rope_mismatch", "sliding_window", "tie_word_embeddings")
#: Per-expert keys the gates do not read (the training texts are router training's).
NOT_READ_PER_EXPERT = ("train_texts",)
#: A key: 16 hex digits of the hash (64 bits: no collision among the gates of any set of merges).
GATES_KEY_PATTERN = r"[0-9a-f]{16}"
#: Part of every hash, so that a change in how gates are computed can give every gates file a new key.
_KEY_FORMAT = "moeforge gates 1"


def gates_settings(plan: Plan) -> dict[str, Any]:
    """Everything the gates of ``plan`` are computed from, as JSON: the gates job's one parameter."""
    recipe = plan.recipe.to_dict()
    for key in NOT_READ:
        recipe.pop(key)
    for group in ("experts", "shared_experts"):
        recipe[group] = [{k: v for k, v in e.items() if k not in NOT_READ_PER_EXPERT} for e in recipe[group]]
    # Named by its bytes: the same base reached by another path or name gives the same gates.
    recipe["base_model"] = plan.sources[plan.base].content_id
    return {"format": _KEY_FORMAT, "recipe": recipe, "dtype": plan.dtype_out, "threads": gates_threads(plan)}


def gates_key(plan: Plan) -> str:
    """The name of the gates file of ``plan``: a hash of ``gates_settings``."""
    return json_sha256(gates_settings(plan))[:16]


def gates_recipe(settings: dict[str, Any]) -> Recipe:
    """The recipe the gates job computes from: the settings' keys, every key left out of them at its default."""
    return Recipe.from_dict(settings["recipe"])
