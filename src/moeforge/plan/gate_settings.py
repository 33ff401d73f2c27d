"""What decides the gates, and its validation: no torch here.

The validate step checks the gate settings before anything is fetched; it needs the settings,
not the gate computation (torch) behind them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Mapping

from moeforge.errors import RecipeError
from moeforge.plan.recipe import GATE_MODES, PROMPTLESS_GATE_MODES

PROMPTLESS_MODES = PROMPTLESS_GATE_MODES
TOKEN_REDUCTIONS = ("last", "mean")
PROMPT_TEMPLATES = ("raw", "chat")


@dataclass(frozen=True)
class ExpertPrompts:
    """One expert's prompts: which inputs should (positive) and should not (negative) route to it."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


@dataclass(frozen=True)
class GateSpec:
    """Everything that decides the gate tensors (the recipe's gate settings).

    ``token_reduction`` applies to ``router_input`` only (``last`` token or ``mean`` over real
    tokens); ``prompt_template`` ``chat`` wraps each prompt in the base tokenizer's chat template
    as one user turn; ``batch_size`` and ``device`` change speed and memory, not the result beyond
    float rounding; ``strict_gates`` turns the degenerate-gate warning into an error.
    """

    mode: str
    experts: tuple[ExpertPrompts, ...]
    shared_experts: tuple[ExpertPrompts, ...] = ()
    seed: int = 0
    token_reduction: str = "last"
    prompt_template: str = "raw"
    router_scale: float | None = None
    batch_size: int = 8
    device: str = "cpu"
    strict_gates: bool = False


def validate_spec(spec: GateSpec) -> None:
    """Reject settings that cannot produce gates, before anything is loaded."""
    if spec.mode not in GATE_MODES:
        raise RecipeError(
            f"unknown gate_mode {spec.mode!r}", where="gate_mode", fix=f"use one of: {', '.join(GATE_MODES)}"
        )
    if not spec.experts:
        raise RecipeError("the recipe has no experts", where="experts", fix="list at least one expert")
    _check_choice(spec.token_reduction, TOKEN_REDUCTIONS, "token_reduction")
    _check_choice(spec.prompt_template, PROMPT_TEMPLATES, "prompt_template")
    if spec.batch_size < 1:
        raise RecipeError(f"batch_size must be at least 1, got {spec.batch_size}", where="batch_size")
    if spec.router_scale is not None:
        _check_router_scale(spec)
    if spec.mode not in PROMPTLESS_MODES:
        for where, expert in named_groups(spec):
            if not expert.positive:
                raise RecipeError(
                    f"expert {expert.name!r} has no positive_prompts, which gate_mode {spec.mode!r} needs",
                    where=where,
                    fix="add positive_prompts to it, or use a gate_mode that needs none "
                    f"({', '.join(PROMPTLESS_MODES)})",
                )


def _check_choice(value: str, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise RecipeError(f"unknown {key} {value!r}", where=key, fix=f"use one of: {', '.join(choices)}")


def _check_router_scale(spec: GateSpec) -> None:
    scale = spec.router_scale
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise RecipeError(f"router_scale must be a positive number, got {scale!r}", where="router_scale")
    if spec.mode in PROMPTLESS_MODES:
        raise RecipeError(
            f"router_scale is calibrated on the prompts' router inputs; gate_mode {spec.mode!r} has none",
            where="router_scale",
            fix="remove router_scale, or use a prompt-based gate_mode",
        )
    if len(spec.experts) < 2:
        raise RecipeError(
            "router_scale needs at least two experts (it calibrates the spread of logits across experts)",
            where="router_scale",
            fix="remove router_scale",
        )


def render_prompt(tokenizer: Any, prompt: str, template: str) -> str:
    """The text the base model reads for one prompt (special tokens written out as text).

    ``raw`` is mergekit-moe's ``bos_token + prompt``: an empty prompt is the bos token alone.
    """
    if template == "raw":
        return (tokenizer.bos_token or "") + prompt
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError(
            "prompt_template 'chat' needs a chat template, and the base tokenizer has none",
            where="prompt_template",
            fix="use prompt_template: raw, or a base model whose tokenizer has a chat template",
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=False
    )


def check_prompt_tokens(spec: GateSpec, tokenizer: Any, max_positions: int | None) -> None:
    """Every prompt, rendered as the gates will read it, has a token and fits the base's context.

    A prompt longer than ``max_position_embeddings`` is refused, not truncated: the base cannot
    read past its context, and cutting a prompt silently would change what routes where.
    """
    if spec.mode in PROMPTLESS_MODES:
        return
    for where, group in named_groups(spec):
        for kind, prompts in (("positive_prompts", group.positive), ("negative_prompts", group.negative)):
            for i, prompt in enumerate(prompts):
                text = render_prompt(tokenizer, prompt, spec.prompt_template)
                count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                if count == 0:
                    raise RecipeError(f"{kind}[{i}] {prompt!r} gives no tokens (the base tokenizer has no bos "
                                      "token to stand for an empty prompt)", where=where,
                                      fix="write some text in the prompt, or remove it")
                if max_positions and count > max_positions:
                    raise RecipeError(f"{kind}[{i}] is {count} tokens long as the gates read it (special tokens "
                                      "such as bos included), more than the base model's max_position_embeddings "
                                      f"({max_positions})", where=where,
                                      fix=f"shorten it by at least {count - max_positions} token(s)")


def named_groups(spec: GateSpec) -> list[tuple[str, ExpertPrompts]]:
    """Routed then shared experts, each with its recipe location for messages."""
    routed = [(f"experts[{i}] ({e.name})", e) for i, e in enumerate(spec.experts)]
    shared = [(f"shared_experts[{i}] ({e.name})", e) for i, e in enumerate(spec.shared_experts)]
    return routed + shared


def gate_spec(plan: Mapping[str, Any]) -> Any:
    """The GateSpec a plan's recipe asks for."""
    return recipe_gate_spec(plan["recipe"])


def recipe_gate_spec(recipe: Mapping[str, Any]) -> Any:
    """The GateSpec of a recipe in its plan form (``Recipe.to_dict()``)."""

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
