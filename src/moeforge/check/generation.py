"""Greedy generation for the smoke test: the one check that holds a whole model, so only when it fits.

Every other smoke figure is computed one decoder layer at a time (``gates.layerwise``), but greedy
decoding re-reads every weight for every new token; streamed from disk that is the whole
checkpoint read ``max_new_tokens`` times per prompt. Generation therefore runs on a whole model,
one model at a time, and is skipped, with the reason and what to raise, when the memory budget is
smaller than that. The model is the one the streamed comparison loaded as it went (it keeps every
module when generation follows), so the checkpoint is read once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from moeforge.gates.layerwise import CheckpointTensors
from moeforge.io.safetensors_file import ITEMSIZE
from moeforge.memory_budget import MIB, MemoryBudget, gib, peak_rss, whole_model_mb

_log = logging.getLogger("moeforge")


@dataclass(frozen=True)
class Generation:
    """A greedy continuation: its new token ids and their text."""

    new_tokens: list[int]
    text: str


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """The model's weights in ``dtype``, from the safetensors headers (no tensor read)."""
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return sum(e.nbytes // ITEMSIZE[e.dtype] * itemsize for e in CheckpointTensors(model_dir).entries().values())


def whole_model_bytes(model_dirs: list[Path], dtype: str) -> int:
    """Memory to generate with each model in turn (never two at once), in ``dtype``."""
    return whole_model_mb(max(weight_bytes(d, dtype) for d in model_dirs)) * MIB


def skip_reason(need: int, budget: MemoryBudget, dtype: str) -> str | None:
    """Why generation cannot load the whole model within ``budget``; None when it can (or nothing is known)."""
    if budget.allows(need):
        return None
    smaller = " (or set smoke.dtype: bfloat16, which needs about half)" if dtype == "float32" else ""
    if budget.limit is None or (budget.available is not None and budget.available < budget.limit):
        over = (f"{gib(budget.available)} this machine has available (MemAvailable; no cgroup limit applies, "
                f"and nothing enforces {budget.source})")
        how = "free memory or use a machine with more, or set smoke.memory_gb in the workflow config to what the " \
              "job may use"
    else:
        over = f"memory budget of {gib(budget.limit)} ({budget.source})"
        how = f"the budget must be at least {gib(need)}: {budget.raise_how}"
    return (f"greedy generation skipped: it loads the whole model, about {gib(need)} in {dtype}, over the {over}; "
            f"the comparison and routing figures were computed layer by layer regardless. To generate, {how}{smaller}")


def eos_ids(model_dir: Path, config: Any, tokenizer: Any) -> list[int]:
    """Every id that ends generation: the model's generation config, its config and the tokenizer's EOS.

    Read from the files, as ``from_pretrained`` would set ``model.generation_config``, so the ids are
    known without loading the model.
    """
    try:
        generation = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    ids: set[int] = set()
    for value in (generation.eos_token_id, config.eos_token_id, tokenizer.eos_token_id):
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    return sorted(ids)


def generate_all(model: torch.nn.Module, prompt_ids: list[torch.Tensor], tokenizer: Any, eos: list[int],
                 max_new_tokens: int, name: str) -> list[Generation]:
    """Continue every prompt greedily with ``model`` (the whole model, loaded), then log the peak memory."""
    generated = _generate(model, tokenizer, prompt_ids, eos, max_new_tokens)
    _log.info("generated with %s; peak memory so far %s", name, gib(peak_rss()))
    return generated


@torch.inference_mode()
def _generate(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[torch.Tensor], eos: list[int],
              max_new_tokens: int) -> list[Generation]:
    """Plain greedy continuation of every prompt, in one left-padded batch.

    One batch, not one ``generate`` per prompt: each decoding step then runs every weight once for
    all prompts, which on a CPU is most of the smoke test's time saved. Left padding with its
    attention mask (and the positions transformers derives from it) leaves each prompt's tokens
    as they are alone. The model's own generation config is replaced so that repetition penalties
    or a minimum length cannot hide a degenerate model.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    model.generation_config = GenerationConfig(eos_token_id=eos or None, pad_token_id=pad)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=eos or None, pad_token_id=pad)
    width = max(ids.shape[1] for ids in prompt_ids)
    batch = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, ids in enumerate(prompt_ids):
        batch[row, width - ids.shape[1]:] = ids[0]
        mask[row, width - ids.shape[1]:] = 1
    device = next(model.parameters()).device
    out = model.generate(input_ids=batch.to(device), attention_mask=mask.to(device), generation_config=config)
    return [_until_eos(row[width:].tolist(), eos, tokenizer) for row in out]


def _until_eos(new: list[int], eos: list[int], tokenizer: Any) -> Generation:
    """A row's new tokens up to and including its first end-of-sequence id (the batch pads after it)."""
    end = next((i + 1 for i, token in enumerate(new) if token in eos), len(new))
    return Generation(new[:end], tokenizer.decode(new[:end], skip_special_tokens=True))
