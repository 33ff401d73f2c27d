"""The experts' training texts read as the base tokenizer reads them, and every way one can be unusable.

Validation reads what training will read (``check_train_texts``: each row's first ``tokens_per_expert`` tokens,
one row at a time), so a missing, empty, non-UTF-8, too short or foreign-vocabulary text, or one text given
twice, is refused before any weight is fetched, wherever in that part of the text the fault is; router training
reads them again (``group_tokens``) with the same checks. No torch here: validation runs without it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

from moeforge.errors import RecipeError
from moeforge.io.files import sha256_file
from moeforge.io.text_prefix import prefix_ids
from moeforge.plan.recipe import Recipe, RouterTraining

#: A text whose share of tokens that are no whole character exceeds this is in another vocabulary.
MAX_UNKNOWN_SHARE = 0.5
#: Tokens of every text read to check it (empty, vocabulary), even one whose expert has enough tokens already.
CHECKED_TOKENS = 256
#: A text with fewer distinct tokens than this among its first CHECKED_TOKENS is one character or a few tokens
#: over and over (``aaaa``, a file of zero bytes): no domain's text. The demo's texts have 82-100; a sentence
#: repeated, 9-13.
MIN_DISTINCT_TOKENS = 8
_TEXT_FIX = "give each expert train_texts: UTF-8 text files of its domain (relative paths from the working directory)"


def text_file(path: str) -> Path:
    """A ``train_texts`` entry as the file it names: relative to the working directory, ``~`` expanded, as a local
    model path resolves (the lock records the entry as written and resolves it the same way)."""
    return Path(path).expanduser()


def _not_a_file(path: str, file: Path) -> tuple[str, str]:
    """Why ``path`` names no text file, and what to do: a directory, a pattern and a dangling link each say so."""
    if file.is_dir():
        return f"train text {path} is a directory, not a text file", "list the text files in it in train_texts"
    if file.is_symlink():
        return (f"train text {path} is a link to {os.readlink(file)}, which does not exist",
                "point the link at the text, or list the text itself")
    if file.exists():
        return (f"train text {path} is not a regular file (a device, pipe or socket)",
                "give a text file saved on disk")
    if any(c in path for c in "*?["):
        return (f"train text {path} is a pattern, and train_texts are file paths: patterns are not expanded",
                "list each text file in train_texts")
    if "$" in path:
        return (f"train text {path} names an environment variable, and train_texts are file paths: variables are "
                "not expanded (~ is)", "write the path out")
    if path != path.strip() and text_file(path.strip()).is_file():
        return f"train text {path!r} is not there, but {path.strip()!r} is", "remove the spaces around the path"
    return f"train text {path} not found", _TEXT_FIX


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
    much of the file as they need; a missing, empty, repetitive, non-UTF-8 or foreign-vocabulary text is refused."""
    file = text_file(path)
    if not file.is_file():
        what, fix = _not_a_file(path, file)
        raise RecipeError(what, where, fix)
    try:
        ids = prefix_ids(tokenizer, file, max(CHECKED_TOKENS, max_tokens), f"{where}: {path}", RecipeError,
                         "save the text as UTF-8")
    except OSError as exc:
        raise RecipeError(f"train text {path} cannot be read: {exc.strerror or exc}", where,
                          "make the text readable by the user running the workflow") from None
    if not tokenizer.decode(ids).strip():
        what = "is empty" if file.stat().st_size == 0 else "holds only whitespace"
        raise RecipeError(f"train text {path} {what}", where, _TEXT_FIX)
    distinct = len(set(ids[:CHECKED_TOKENS]))
    if distinct < MIN_DISTINCT_TOKENS and len(ids) > distinct:
        raise RecipeError(
            f"train text {path} repeats {distinct} token(s) over and over: its first {min(len(ids), CHECKED_TOKENS)} "
            f"tokens have {distinct} distinct, where text of a domain has dozens", where, _TEXT_FIX)
    share = unknown_share(tokenizer, ids)
    if share > MAX_UNKNOWN_SHARE:
        raise RecipeError(
            f"train text {path} is mostly in another vocabulary: {share:.0%} of its first {len(ids)} tokens "
            "are not whole characters for the base model's tokenizer", where,
            "give text in a language and script the base model was trained on")
    return ids[:max(0, max_tokens)]


def _texts(recipe: Recipe) -> Iterator[tuple[str, str, Path]]:
    """(gate row, entry as written, file) of every training text, in recipe order."""
    for group in recipe.gate_groups():
        for path in group.train_texts:
            yield group.name, path, text_file(path)


def check_distinct_texts(recipe: Recipe, source: str) -> None:
    """No text is given twice, under any name: listed twice, through a link or another spelling of its path, or
    as a copy (texts of one size are hashed). Twice for one expert it would count double in its windows; for two
    experts, the same windows would be labelled with both, and the routers taught to tell apart what cannot be.
    Entries that are no file are left to ``text_ids`` to refuse."""
    files = [(name, path, file.stat()) for name, path, file in _texts(recipe) if file.is_file()]
    sizes = Counter(stat.st_size for *_, stat in files)
    seen: dict[Hashable, tuple[str, str]] = {}
    for name, path, stat in files:
        keys: dict[str, Hashable] = {"the same file as": (stat.st_dev, stat.st_ino)}
        if sizes[stat.st_size] > 1:
            keys["a copy of"] = sha256_file(text_file(path))
        for how, key in keys.items():
            if key in seen:
                first_name, first_path = seen[key]
                where = "also listed" if first_name == name else f"listed for {first_name}"
                raise RecipeError(
                    f"train text {path} is {how} {first_path} ({where}): the same text would train the routers "
                    "twice" + ("" if first_name == name else ", as two experts' domains"),
                    f"{source}: {name}: train_texts", "give each text once, under the expert of its domain")
        seen.update({key: (name, path) for key in keys.values()})


def group_tokens(recipe: Recipe, tokenizer: Any, tokens_per_group: int, source: str) -> Iterator[list[list[int]]]:
    """Each gate row's texts' tokens, in order, together the first ``tokens_per_group`` of the row (every text is
    read and checked, even one past what the row needs), one row at a time; a text given twice is refused first."""
    check_distinct_texts(recipe, source)
    for group in recipe.gate_groups():
        texts: list[list[int]] = []
        for path in group.train_texts:
            remaining = tokens_per_group - sum(map(len, texts))
            texts.append(text_ids(tokenizer, path, remaining, f"{source}: {group.name}: train_texts"))
        yield texts


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


def check_window_settings(settings: RouterTraining, body: int, max_positions: int | None, source: str) -> None:
    """Windows the model can read, and two of them (one to train on, one held out) within ``tokens_per_expert``:
    longer windows than the base's context would train the routers on positions the model never serves at."""
    if max_positions is not None and settings.seq_len > max_positions:
        raise RecipeError(
            f"seq_len {settings.seq_len} is longer than the base model's context ({max_positions} positions)",
            f"{source}: router_training.seq_len", f"set router_training.seq_len to at most {max_positions}")
    if settings.tokens_per_expert < 2 * body:
        raise RecipeError(
            f"tokens_per_expert {settings.tokens_per_expert} is fewer than the two windows of {body} tokens (one to "
            "train on, one held out) that router_training needs from each expert",
            f"{source}: router_training.tokens_per_expert",
            f"raise router_training.tokens_per_expert to at least {2 * body}, or lower router_training.seq_len")


def check_train_texts(recipe: Recipe, tokenizer: Any, source: str, max_positions: int | None = None) -> None:
    """The training texts' refusals, at validation: the window settings against the base's context, then each
    row's texts read and checked as far as training will read them (a fault anywhere there is refused now, not
    by the training job after the gates and shards), one row's tokens held at a time."""
    settings = recipe.router_training
    if settings is None:
        return
    body = window_body(tokenizer, settings.seq_len)
    check_window_settings(settings, body, max_positions, source)
    rows = group_tokens(recipe, tokenizer, settings.tokens_per_expert, source)
    for group, texts in zip(recipe.gate_groups(), rows, strict=True):
        check_window_count(group.name, sum(map(len, texts)), body, source)
