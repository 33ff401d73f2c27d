"""The recipe's prompts as the gates and the smoke test read them; torch-free, so validation checks them too.

The gates read each prompt rendered by ``prompt_template`` without adding special tokens; the smoke test
runs each prompt as a user would (``tokenizer(text)``, special tokens included). A recipe may hold an
empty prompt, as mergekit-moe allows: both read it as the bos token alone. A prompt that gives no token
even so (a tokenizer without a bos token), or one longer than the base's context, is refused at
validation, naming the recipe key it came from, instead of failing a job after the whole build.
"""

from __future__ import annotations

from typing import Any

from moeforge.errors import RecipeError
from moeforge.plan.recipe import PROMPTLESS_GATE_MODES, Recipe

#: Prompts for a recipe that names no smoke_prompts and no expert prompts (random/cheap_embed gates).
FALLBACK_PROMPTS = ("The quick brown fox", "Once upon a time")


def smoke_prompts(recipe: Recipe) -> list[str]:
    """What the smoke test generates from: the recipe's smoke_prompts, else every expert prompt."""
    expert = [p for e in recipe.experts for p in e.positive_prompts]
    return list(recipe.smoke_prompts) or expert or list(FALLBACK_PROMPTS)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids a user's ``tokenizer(text)`` gives, or the bos token alone for a text that gives none."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return ids


def check_smoke_prompts(recipe: Recipe, tokenizer: Any, max_positions: int | None = None) -> None:
    """Refuse, by recipe key, a prompt the smoke test would read as no tokens, or whose tokens and the recipe's
    ``max_new_tokens`` would run past the base's positions: every smoke prompt, and every expert prompt (the
    routing statistics run those too). The workflow config's ``smoke.max_new_tokens`` is checked by the smoke
    test itself, before it reads a model."""
    keyed = [(f"smoke_prompts[{i}]", p) for i, p in enumerate(recipe.smoke_prompts)]
    keyed += [(f"experts[{i}].positive_prompts[{j}]", p) for i, e in enumerate(recipe.experts)
              for j, p in enumerate(e.positive_prompts)]
    new = recipe.max_new_tokens or 0
    for key, prompt in keyed:
        count = len(prompt_ids(tokenizer, prompt))
        if not count:
            raise RecipeError(f"{prompt!r} gives no tokens with the base model's tokenizer (which has no bos token "
                              "to stand for an empty prompt), so the smoke test could not run it", where=key,
                              fix="write some text in the prompt, or remove it")
        if max_positions and count + new > max_positions:
            with_new = f" and max_new_tokens {new}" if new else ""
            raise RecipeError(f"the prompt is {count} tokens{with_new}, more than the base model's "
                              f"max_position_embeddings ({max_positions}), so the smoke test would run past them",
                              where=key, fix=f"shorten it by at least {count + new - max_positions} token(s)"
                              + (" or lower max_new_tokens" if new else ""))


def render_prompt(tokenizer: Any, prompt: str, template: str) -> str:
    """The text the base model reads for one gate prompt (special tokens written out as text).

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


def check_prompt_tokens(recipe: Recipe, tokenizer: Any, max_positions: int | None) -> None:
    """Every gate prompt, rendered as the gates will read it, has a token and fits the base's context.

    A prompt longer than ``max_position_embeddings`` is refused, not truncated: the base cannot
    read past its context, and cutting a prompt silently would change what routes where.
    """
    if recipe.gate_mode in PROMPTLESS_GATE_MODES:
        return
    groups = [(f"experts[{i}] ({e.name})", e) for i, e in enumerate(recipe.experts)]
    if recipe.shared_gate_group():
        groups += [(f"shared_experts[{i}] ({e.name})", e) for i, e in enumerate(recipe.shared_experts)]
    for where, expert in groups:
        for kind, prompts in (("positive_prompts", expert.positive_prompts),
                              ("negative_prompts", expert.negative_prompts)):
            for i, prompt in enumerate(prompts):
                text = render_prompt(tokenizer, prompt, recipe.prompt_template)
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
