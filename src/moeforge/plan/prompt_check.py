"""The validate job's checks that need the base model's tokenizer (and transformers): the prompts' tokens and
the training texts (moeforge.plan.train_texts)."""

from __future__ import annotations

from pathlib import Path

from moeforge.errors import ModelError
from moeforge.io.hf_load import load_tokenizer
from moeforge.plan.params import read_params
from moeforge.plan.prompts import check_prompt_tokens, check_smoke_prompts
from moeforge.plan.recipe import PROMPTLESS_GATE_MODES, Recipe
from moeforge.plan.train_texts import check_train_texts


def check_token_inputs(recipe: Recipe, base_meta: Path, source: str = "recipe") -> None:
    """What is read with the base's tokenizer, checked with it once loaded: every prompt, rendered as the gates
    will read it, has a token and fits the base's context; every prompt the smoke test runs has a token as a
    user's tokenizer call reads it; and the training texts (when the recipe trains its routers) are there,
    UTF-8, in the base's vocabulary, long enough and each given once, in windows that fit the base's context,
    before any weight is fetched."""
    tokenizer = load_tokenizer(base_meta, ModelError, "the base model's tokenizer",
                               "the gates and the smoke test read the prompts with it: check the base's tokenizer "
                               "files", generic=True)
    max_positions = read_params(recipe.base_model, base_meta)[2].get("max_position_embeddings")
    if recipe.gate_mode not in PROMPTLESS_GATE_MODES:
        check_prompt_tokens(recipe, tokenizer, max_positions)
    check_smoke_prompts(recipe, tokenizer, max_positions)
    check_train_texts(recipe, tokenizer, source, max_positions)
