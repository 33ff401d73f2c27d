"""The experts' training texts: read, checked and cut into windows before any training starts.

Every way a text can be unusable is one message naming the expert and the file: missing, empty, not UTF-8,
too short for one training and one held-out window, or written in another vocabulary than the base
tokenizer's (mostly tokens that are not a whole character: unknown tokens, or the single bytes a byte-level
tokenizer falls back to). Validation has read and checked the same tokens already (moeforge.plan.train_texts);
the texts are checked again here as they are read. Windows are the evaluation's: ``seq_len - 1`` tokens
read after the bos token (``seq_len`` where the tokenizer has none); the first position, which has no
context, trains nothing.
Every ``1 / heldout_fraction``-th window is held out, spread over the text, to measure routing accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeforge.io.files import sha256_file
from moeforge.plan.recipe import Recipe, RouterTraining
from moeforge.plan.train_texts import check_window_count, group_tokens, text_file, window_body


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


def _streams(recipe: Recipe, tokenizer: Any, settings: RouterTraining, source: str
             ) -> tuple[list[list[int]], list[TextRecord]]:
    """Each gate row's tokens (its texts in order, the first ``tokens_per_expert``) and the texts' records."""
    streams, records = [], []
    for group, texts in zip(recipe.gate_groups(), group_tokens(recipe, tokenizer, settings.tokens_per_expert, source),
                            strict=True):
        for path, ids in zip(group.train_texts, texts, strict=True):
            file = text_file(path)
            records.append(TextRecord(group.name, path, file.stat().st_size, sha256_file(file), len(ids)))
        streams.append([token for ids in texts for token in ids])
    return streams, records


def training_windows(recipe: Recipe, tokenizer: Any, settings: RouterTraining, source: str) -> TrainingWindows:
    """Every gate row's windows, checked: each row has at least one training and one held-out window."""
    streams, records = _streams(recipe, tokenizer, settings, source)
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    body = window_body(tokenizer, settings.seq_len)
    every = max(2, round(1 / settings.heldout_fraction))
    rows, groups, heldout = [], [], []
    for index, (group, stream) in enumerate(zip(recipe.gate_groups(), streams, strict=True)):
        count = check_window_count(group.name, len(stream), body, source)
        for w in range(count):
            piece = stream[w * body:(w + 1) * body]
            rows.append(prefix + piece)
            groups.append(index)
            heldout.append(w % every == every - 1 or (count < every and w == count - 1))
    return TrainingWindows(torch.tensor(rows), torch.tensor(groups), torch.tensor(heldout),
                           tuple(g.name for g in recipe.gate_groups()), tuple(records))
