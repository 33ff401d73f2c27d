"""The prompts' token check of the validate job: it needs the base model's tokenizer (and transformers)."""

from __future__ import annotations

from pathlib import Path

from moeforge.errors import ModelError
from moeforge.io.hf_load import load_tokenizer
from moeforge.plan.params import read_params
from moeforge.plan.prompts import check_prompt_tokens, check_smoke_prompts
from moeforge.plan.recipe import PROMPTLESS_GATE_MODES, Recipe


def check_prompts(recipe: Recipe, base_meta: Path) -> None:
    """Every prompt, rendered as the gates will read it, has a token and fits the base's context; and every
    prompt the smoke test runs has a token as a user's tokenizer call reads it."""
    tokenizer = load_tokenizer(base_meta, ModelError, "the base model's tokenizer",
                               "the gates and the smoke test read the prompts with it: check the base's tokenizer "
                               "files", generic=True)
    max_positions = read_params(recipe.base_model, base_meta)[2].get("max_position_embeddings")
    if recipe.gate_mode not in PROMPTLESS_GATE_MODES:
        check_prompt_tokens(recipe, tokenizer, max_positions)
    check_smoke_prompts(recipe, tokenizer, max_positions)
