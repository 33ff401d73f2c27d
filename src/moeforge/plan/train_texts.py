"""The experts' training texts read as the base tokenizer reads them, and every way one can be unusable.

Validation reads the first two windows of each expert's texts (``check_train_texts``), so a missing, empty,
non-UTF-8, too short or foreign-vocabulary text is refused before any weight is fetched; router training
reads them in full (``group_tokens``) with the same checks. No torch here: validation runs without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeforge.errors import RecipeError
from moeforge.io.text_prefix import prefix_ids
from moeforge.plan.recipe import Recipe

#: A text whose share of tokens that are no whole character exceeds this is in another vocabulary.
MAX_UNKNOWN_SHARE = 0.5
#: Tokens of every text read to check it (empty, vocabulary), even one whose expert has enough tokens already.
CHECKED_TOKENS = 256
_TEXT_FIX = "give each expert train_texts: UTF-8 text files of its domain (relative paths from the working directory)"


def unknown_share(tokenizer: Any, ids: list[int]) -> float:
    """The share of ``ids`` that are no whole character: the unknown token, or a piece of a character."""
    if not ids:
        return 0.0
    unknown = {getattr(tokenizer, "unk_token_id", None)} - {None}
    for token in set(ids) - unknown:
        if "\ufffd" in tokenizer.decode([token]):
            unknown.add(token)
    return sum(token in unknown for token in ids) / len(ids)


def text_ids(tokenizer: Any, path: str, max_tokens: int, where: str) -> list[int]:
    """The text's first ``max_tokens`` tokens (at least CHECKED_TOKENS are read and checked), reading only as
    much of the file as they need; a missing, empty, non-UTF-8 or foreign-vocabulary text is refused."""
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"train text {path} not found" + (" (it is a directory)" if file.is_dir() else ""),
                          where, _TEXT_FIX)
    ids = prefix_ids(tokenizer, file, max(CHECKED_TOKENS, max_tokens), f"{where}: {path}", RecipeError,
                     "save the text as UTF-8")
    if not tokenizer.decode(ids).strip():
        raise RecipeError(f"train text {path} is empty", where, _TEXT_FIX)
    share = unknown_share(tokenizer, ids)
    if share > MAX_UNKNOWN_SHARE:
        raise RecipeError(
            f"train text {path} is mostly in another vocabulary: {share:.0%} of its first {len(ids)} tokens "
            "are not whole characters for the base model's tokenizer", where,
            "give text in a language and script the base model was trained on")
    return ids[:max(0, max_tokens)]


def group_tokens(recipe: Recipe, tokenizer: Any, tokens_per_group: int, source: str) -> list[list[list[int]]]:
    """Each gate row's texts' tokens, in order, together the first ``tokens_per_group`` of the row (every text is
    read and checked, even one past what the row needs)."""
    groups = []
    for group in recipe.gate_groups():
        texts: list[list[int]] = []
        for path in group.train_texts:
            remaining = tokens_per_group - sum(map(len, texts))
            texts.append(text_ids(tokenizer, path, remaining, f"{source}: {group.name}: train_texts"))
        groups.append(texts)
    return groups


def window_body(tokenizer: Any, seq_len: int) -> int:
    """Tokens of text in one window: ``seq_len`` less the bos token the window starts with (where there is one)."""
    return seq_len - (tokenizer.bos_token_id is not None)


def check_window_count(name: str, tokens: int, body: int, source: str) -> int:
    """How many windows a row's tokens make; fewer than two (one to train on, one held out) is refused."""
    count = tokens // body
    if count < 2:
        raise RecipeError(
            f"{name}'s train_texts give {tokens} tokens, fewer than the two windows of {body} tokens (one to train "
            "on, one held out) that router_training needs",
            f"{source}: {name}: train_texts", "give longer texts, or lower router_training.seq_len")
    return count


def check_train_texts(recipe: Recipe, tokenizer: Any, source: str) -> None:
    """The training texts' refusals, at validation: two windows' worth of each row's texts read and checked."""
    if recipe.router_training is None:
        return
    body = window_body(tokenizer, recipe.router_training.seq_len)
    for group, texts in zip(recipe.gate_groups(), group_tokens(recipe, tokenizer, 2 * body, source), strict=True):
        check_window_count(group.name, sum(map(len, texts)), body, source)
