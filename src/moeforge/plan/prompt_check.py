"""The validate job's checks that need the base model's tokenizer (and transformers): the prompts' tokens and
the training texts (moeforge.plan.train_texts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeforge.errors import ModelError
from moeforge.io.hf_load import load_tokenizer
from moeforge.plan.params import read_params
from moeforge.plan.prompts import check_prompt_tokens, check_smoke_prompts
from moeforge.plan.recipe import PROMPTLESS_GATE_MODES, Recipe
from moeforge.plan.train_texts import check_train_texts


def base_tokenizer(base_meta: Path) -> Any:
    """The base model's tokenizer, as the gates, the smoke test and router training read text with it."""
    return load_tokenizer(base_meta, ModelError, "the base model's tokenizer",
                          "the gates and the smoke test read the prompts with it: check the base's tokenizer files",
                          generic=True)


def check_prompts(recipe: Recipe, base_meta: Path) -> None:
    """Every prompt, rendered as the gates will read it, has a token and fits the base's context; and every
    prompt the smoke test runs has a token as a user's tokenizer call reads it."""
    tokenizer = base_tokenizer(base_meta)
    max_positions = read_params(recipe.base_model, base_meta)[2].get("max_position_embeddings")
    if recipe.gate_mode not in PROMPTLESS_GATE_MODES:
        check_prompt_tokens(recipe, tokenizer, max_positions)
    check_smoke_prompts(recipe, tokenizer, max_positions)


def check_texts(recipe: Recipe, base_meta: Path, source: str) -> None:
    """The training texts, when the recipe trains its routers: there, UTF-8, in the base's vocabulary and long
    enough for router training, checked before any weight is fetched."""
    if recipe.router_training is not None:
        check_train_texts(recipe, base_tokenizer(base_meta), source)
