"""The experts' training texts: read, checked and cut into windows before any training starts.

Every way a text can be unusable is one message naming the expert and the file: missing, empty, not UTF-8,
too short for one training and one held-out window, or written in another vocabulary than the base
tokenizer's (mostly tokens that are not a whole character: unknown tokens, or the single bytes a byte-level
tokenizer falls back to). Windows are the evaluation's: ``seq_len - 1`` tokens read after the bos token
(``seq_len`` where the tokenizer has none); the first position, which has no context, trains nothing.
Every ``1 / heldout_fraction``-th window is held out, spread over the text, to measure routing accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeforge.errors import RecipeError
from moeforge.io.files import sha256_file
from moeforge.io.text_prefix import prefix_ids
from moeforge.plan.recipe import Recipe, RouterTraining

#: A text whose share of tokens that are no whole character exceeds this is in another vocabulary.
MAX_UNKNOWN_SHARE = 0.5
#: Tokens of every text read to check it (empty, vocabulary), even one whose expert has enough tokens already.
CHECKED_TOKENS = 256
_TEXT_FIX = "give each expert train_texts: UTF-8 text files of its domain (relative paths from the working directory)"


@dataclass(frozen=True)
class TextRecord:
    """One training text as the lock and the report record it."""

    expert: str
    path: str
    size: int
    sha256: str
    tokens: int  # of this text used for training (tokens_per_expert bounds what is read)


@dataclass(frozen=True)
class TrainingWindows:
    """Every gate row's windows: ``ids`` [N, seq_len], the gate row (group) of each window, held out or not."""

    ids: torch.Tensor
    group: torch.Tensor
    heldout: torch.Tensor
    groups: tuple[str, ...]
    records: tuple[TextRecord, ...]


def unknown_share(tokenizer: Any, ids: list[int]) -> float:
    """The share of ``ids`` that are no whole character: the unknown token, or a piece of a character."""
    if not ids:
        return 0.0
    unknown = {getattr(tokenizer, "unk_token_id", None)} - {None}
    for token in set(ids) - unknown:
        if "\ufffd" in tokenizer.decode([token]):
            unknown.add(token)
    return sum(token in unknown for token in ids) / len(ids)


def _read_ids(tokenizer: Any, path: str, max_tokens: int, where: str) -> list[int]:
    """The text's first ``max_tokens`` tokens, reading only as much of the file as they need."""
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"train text {path} not found" + (" (it is a directory)" if file.is_dir() else ""),
                          where, _TEXT_FIX)
    ids = prefix_ids(tokenizer, file, max_tokens, f"{where}: {path}", RecipeError, "save the text as UTF-8")
    if not tokenizer.decode(ids).strip():
        raise RecipeError(f"train text {path} is empty", where, _TEXT_FIX)
    return ids


def group_tokens(recipe: Recipe, tokenizer: Any, settings: RouterTraining, source: str
                 ) -> tuple[list[list[int]], list[TextRecord]]:
    """Each gate row's tokens (its texts in order, the first ``tokens_per_expert``) and the texts' records (a
    text past what is needed is hashed, never tokenised)."""
    streams, records = [], []
    for group in recipe.gate_groups():
        stream: list[int] = []
        for path in group.train_texts:
            where = f"{source}: {group.name}: train_texts"
            remaining = settings.tokens_per_expert - len(stream)
            ids = _read_ids(tokenizer, path, max(CHECKED_TOKENS, remaining), where)
            share = unknown_share(tokenizer, ids)
            if share > MAX_UNKNOWN_SHARE:
                raise RecipeError(
                    f"train text {path} is mostly in another vocabulary: {share:.0%} of its first {len(ids)} tokens "
                    "are not whole characters for the base model's tokenizer", where,
                    "give text in a language and script the base model was trained on")
            used = ids[:remaining]
            records.append(TextRecord(group.name, path, Path(path).stat().st_size, sha256_file(Path(path)), len(used)))
            stream += used
        streams.append(stream)
    return streams, records


def training_windows(recipe: Recipe, tokenizer: Any, settings: RouterTraining, source: str) -> TrainingWindows:
    """Every gate row's windows, checked: each row has at least one training and one held-out window."""
    streams, records = group_tokens(recipe, tokenizer, settings, source)
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    body = settings.seq_len - len(prefix)
    every = max(2, round(1 / settings.heldout_fraction))
    rows, groups, heldout = [], [], []
    for index, (group, stream) in enumerate(zip(recipe.gate_groups(), streams, strict=True)):
        count = len(stream) // body
        if count < 2:
            raise RecipeError(
                f"{group.name}'s train_texts give {len(stream)} tokens, fewer than the two windows of "
                f"{body} tokens (one to train on, one held out) that router_training needs",
                f"{source}: {group.name}: train_texts", "give longer texts, or lower router_training.seq_len")
        for w in range(count):
            piece = stream[w * body:(w + 1) * body]
            rows.append(prefix + piece)
            groups.append(index)
            heldout.append(w % every == every - 1 or (count < every and w == count - 1))
    return TrainingWindows(torch.tensor(rows), torch.tensor(groups), torch.tensor(heldout),
                           tuple(g.name for g in recipe.gate_groups()), tuple(records))
