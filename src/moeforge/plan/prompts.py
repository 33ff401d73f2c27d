"""The smoke test's prompts and how it reads them; torch-free, so validation checks them too.

The smoke test runs each prompt as a user would (``tokenizer(text)``, special tokens included). A
recipe may hold an empty prompt, as mergekit-moe allows: the gates read it as the bos token alone,
and so does the smoke test. A prompt that gives no token even so (a tokenizer without a bos token)
is refused at validation, naming the recipe key it came from, instead of failing the smoke test
after the whole build.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeforge.errors import RecipeError

#: Prompts for a recipe that names no smoke_prompts and no expert prompts (random/cheap_embed gates).
FALLBACK_PROMPTS = ("The quick brown fox", "Once upon a time")


def smoke_prompts(recipe: Mapping[str, Any]) -> list[str]:
    """What the smoke test generates from: the recipe's smoke_prompts, else every expert prompt."""
    expert = [p for e in recipe["experts"] for p in e.get("positive_prompts") or []]
    return list(recipe.get("smoke_prompts") or []) or expert or list(FALLBACK_PROMPTS)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids a user's ``tokenizer(text)`` gives, or the bos token alone for a text that gives none."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return ids


def check_smoke_prompts(recipe: Mapping[str, Any], tokenizer: Any) -> None:
    """Refuse, by recipe key, a prompt the smoke test would read as no tokens: every smoke prompt, and
    every expert prompt (the routing statistics run those too)."""
    keyed = [(f"smoke_prompts[{i}]", p) for i, p in enumerate(recipe.get("smoke_prompts") or [])]
    keyed += [(f"experts[{i}].positive_prompts[{j}]", p) for i, e in enumerate(recipe["experts"])
              for j, p in enumerate(e.get("positive_prompts") or [])]
    for key, prompt in keyed:
        if not prompt_ids(tokenizer, prompt):
            raise RecipeError(f"{prompt!r} gives no tokens with the base model's tokenizer (which has no bos token "
                              "to stand for an empty prompt), so the smoke test could not run it", where=key,
                              fix="write some text in the prompt, or remove it")
