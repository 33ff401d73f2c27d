"""``end_to_end`` router training's memory, from the plan: the rule's ``mem_mb`` request, and the refusal at
validation of a recipe whose own budget (``router_training.memory_gb``) is smaller, before any weight is fetched.
"""

from __future__ import annotations

from moeforge.errors import RecipeError
from moeforge.io.progress import GIB
from moeforge.io.safetensors_file import ITEMSIZE
from moeforge.memory_need import end_to_end_training_bytes
from moeforge.plan.plan_json import Plan


def end_to_end_bytes(plan: Plan) -> int:
    """Memory ``end_to_end`` router training needs for the plan's MoE (``end_to_end_training_bytes``)."""
    settings = plan.recipe.router_training
    if settings is None:
        raise ValueError("the plan's recipe has no router_training")
    return end_to_end_training_bytes(plan.total_bytes * 4 // ITEMSIZE[plan.dtype_out], plan.hidden_size,
                                     plan.num_layers, plan.base_params["vocab_size"],
                                     settings.batch_size * settings.seq_len)


def check_training_memory(plan: Plan, source: str) -> None:
    """``end_to_end`` over the recipe's own budget (``router_training.memory_gb``) is refused now: the plan knows
    the model's size, so no weight need be fetched to learn that it does not fit. A budget the job reads (its
    cgroup, its mem_mb) is known only to the job, which checks it again before any training."""
    settings = plan.recipe.router_training
    if settings is None or settings.method != "end_to_end" or settings.memory_gb is None:
        return
    need = end_to_end_bytes(plan)
    if need > settings.memory_gb * GIB:
        raise RecipeError(
            f"router_training method end_to_end needs the whole model in memory: about {need / GIB:.2f} GiB, over "
            f"the budget of {settings.memory_gb:.2f} GiB (router_training.memory_gb in the recipe)",
            f"{source}: router_training.memory_gb",
            "use method: layerwise (bounded by one layer at any size), or raise router_training.memory_gb")
