"""Greedy generation for the smoke test: on the whole model when it fits, else one layer at a time.

Every other smoke figure is computed one decoder layer at a time (``runtime.layerwise``), but greedy
decoding re-reads every weight for every new token. Generation therefore runs on a whole model, one
model at a time, when the memory budget holds it; the model is then the one the streamed comparison
loaded as it went (it keeps every module when generation follows), so the checkpoint is read once.
Over the budget it runs one decoder layer at a time (``layerwise.streamed_model``), reading the
checkpoint again for every new token: slower, but a 48 GB merge on a 32 GB machine still shows what
it generates. The layers that the rest of the budget holds stay loaded, so only the others are read
again. Only a budget under even one layer at a time skips it, with the reason and what to raise.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation import BaseStreamer

from moeforge.io.progress import MIB, Progress
from moeforge.io.safetensors_file import ITEMSIZE
from moeforge.memory_need import whole_model_mb
from moeforge.runtime.layerwise import CheckpointTensors
from moeforge.runtime.memory_budget import MemoryBudget, gib, peak_rss

_log = logging.getLogger("moeforge")


@dataclass(frozen=True)
class Generation:
    """A greedy continuation: its new token ids, their text, and at each step how far the chosen token's logit
    was above the runner-up's (a gap within numerical noise is a near tie, which another engine may break the
    other way)."""

    new_tokens: list[int]
    text: str
    #: At each step, the chosen token's logit and the runner-up's.
    top2: list[tuple[float, float]] = field(default_factory=list)


#: Beside the weights, a job generating one layer at a time holds torch, the tokenizer, the cache and
#: the activations: 0.6 GiB peak for a 135M-shape MoE, weights included.
STREAMED_OVERHEAD = 1000 * MIB
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class LayerSizes:
    """A checkpoint's weights in some dtype, split as streamed generation holds them: ``outside`` the decoder
    layers (embedding, norm, head) and each decoder layer's bytes, by layer index; ``upcast``: the float32
    copy of the largest module (a decoder layer, or the embedding or head) held while it runs, for a 16-bit
    model computed in float32 (``runtime.upcast``), else 0."""

    outside: int
    layers: list[int]
    upcast: int = 0

    @classmethod
    def of(cls, model_dir: Path, dtype: str, upcast: bool = False) -> LayerSizes:
        """From the safetensors headers alone (no tensor read); ``upcast``: the model computes in float32."""
        itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        layers: dict[int, int] = {}
        outside, largest_outside = 0, 0
        for name, entry in CheckpointTensors(model_dir).entries().items():
            size = entry.nbytes // ITEMSIZE[entry.dtype] * itemsize
            match = _LAYER.search(name)
            if match:
                layers[int(match.group(1))] = layers.get(int(match.group(1)), 0) + size
            else:
                outside += size
                largest_outside = max(largest_outside, size)
        sizes = [layers[i] for i in sorted(layers)]
        copy = max([*sizes, largest_outside]) * 4 // itemsize if upcast and itemsize < 4 else 0
        return cls(outside, sizes, copy)

    def whole(self) -> int:
        """Memory to load the whole model and generate with it (``moeforge.memory_need.whole_model_mb``)."""
        return whole_model_mb(self.outside + sum(self.layers)) * MIB

    def streamed(self) -> int:
        """Memory to generate one decoder layer at a time (``layerwise.streamed_model``): all that lies outside
        the decoder layers (the embedding and norm, kept; an untied head, while it runs), the largest layer
        three times over (the file pages it is read from, the copies made while its experts are fused, its
        weights: a 1B-class MoE measured 2.6 layers in bfloat16, 1.8 in float32), the float32 copy of a module
        computed upcast, and the overhead."""
        return STREAMED_OVERHEAD + self.outside + 3 * max(self.layers, default=0) + self.upcast

    def resident(self, room: int) -> int:
        """How many decoder layers, from the first, stay loaded in ``room`` bytes beside streamed generation;
        at least one is left to stream (when every layer fits, the whole model is the plan to make)."""
        return sum(1 for total in accumulate(self.layers[:-1]) if total <= room)


@dataclass(frozen=True)
class GenerationPlan:
    """How greedy generation runs within the memory budget: ``mode`` "whole" (the model loaded), "streamed"
    (decoder layers read one at a time for every token, see ``layerwise.streamed_model``) or None (skipped);
    ``note`` says why it is not "whole", with the memory each way needs and what to raise. ``resident`` gives,
    for streamed generation, how many decoder layers of each model stay loaded in the room the budget leaves
    beside it: each one kept is one layer fewer to read per token."""

    mode: str | None
    note: str | None
    whole: int
    streamed: int | None = None
    resident: Mapping[Path, int] = field(default_factory=dict)


def plan_generation(model_dirs: list[Path], budget: MemoryBudget, dtype: str, upcast: bool = False) -> GenerationPlan:
    """The whole model when it fits ``budget``; else one layer at a time, with as many layers kept loaded as
    the rest of the budget holds, when that fits; else no generation. ``upcast``: a 16-bit ``dtype`` is
    computed in float32, one module upcast at a time (on a CPU)."""
    sizes = {d: LayerSizes.of(d, dtype, upcast) for d in model_dirs}
    whole = max(s.whole() for s in sizes.values())  # one model at a time, never two at once
    if budget.allows(whole):
        return GenerationPlan("whole", None, whole)
    streamed = max(s.streamed() for s in sizes.values())
    over, how = over_budget(budget, whole)
    if budget.allows(streamed):
        resident = {d: s.resident(budget.bound - s.streamed()) for d, s in sizes.items()}
        kept, total = resident[model_dirs[0]], len(sizes[model_dirs[0]].layers)
        ran = ("greedy generation ran one decoder layer at a time" if not kept else
               f"greedy generation kept the first {kept} of {total} decoder layers loaded and ran the others one "
               "at a time")
        return GenerationPlan("streamed", (
            f"{ran}, reading the weights again for every new token, because generating with the whole model loaded "
            f"needs about {gib(whole)} in {dtype}, over the {over}; to load it whole (faster), {how}"), whole, streamed,
            resident)
    smaller = _smaller_dtype_hint(model_dirs, budget, dtype, upcast)
    _, how = over_budget(budget, streamed)
    return GenerationPlan(None, (
        f"greedy generation skipped: even one decoder layer at a time it needs about {gib(streamed)} in {dtype} "
        f"(with the whole model loaded, about {gib(whole)}), over the {over}; the comparison and routing figures were computed "
        f"layer by layer regardless. To generate, {how}{smaller}"), whole, streamed)


def _smaller_dtype_hint(model_dirs: list[Path], budget: MemoryBudget, dtype: str, upcast: bool) -> str:
    """Suggest bfloat16 only where it would let generation run: for a small model the fixed overhead of streamed
    generation, not the weights, is what exceeds the budget. ``upcast``: the device computes 16-bit models in
    float32 (whatever ``dtype`` says, which float32 does not upcast)."""
    if dtype != "float32":
        return ""
    half = max(LayerSizes.of(d, "bfloat16", upcast).streamed() for d in model_dirs)
    return f" (or set smoke.dtype: bfloat16, which needs about {gib(half)})" if budget.allows(half) else ""


def over_budget(budget: MemoryBudget, need: int) -> tuple[str, str]:
    """What ``need`` bytes are over (the budget, or the memory available where nothing enforces the
    budget), and how a user gives the job at least ``need``."""
    if budget.limit is None or (budget.available is not None and budget.available < budget.limit):
        return (f"{gib(budget.available)} this machine has available (MemAvailable; no cgroup limit applies, "
                f"and nothing enforces {budget.source})",
                "free memory or use a machine with more, or set smoke.memory_gb in the workflow config to what "
                "the job may use")
    return f"memory budget of {gib(budget.limit)} ({budget.source})", \
        f"the budget must be at least {gib(need)}: {budget.raise_how}"


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
    """Continue every prompt greedily with ``model`` (the whole model, loaded), then log how long it took
    and the peak memory, so a slow or large smoke test's log shows where its time and memory went."""
    started = time.perf_counter()
    progress = Progress(f"{Path(name).name}: greedy generation", len(prompt_ids) * max_new_tokens, "new tokens")
    generated = _generate(model, tokenizer, prompt_ids, eos, max_new_tokens, _TokenCount(progress))
    _log.info("generated up to %d new tokens for %d prompts with %s in %.1f s; peak memory so far %s", max_new_tokens,
              len(prompt_ids), name, time.perf_counter() - started, gib(peak_rss()))
    return generated


class _TokenCount(BaseStreamer):
    """Advances a Progress by the tokens each decoding step adds (one per prompt of the batch).

    Each new token is a forward pass over the whole model, a streamed one when it is read a layer at a
    time: a 1B-class merge spends minutes here, and without this the job would say nothing until the end.
    ``generate`` hands a streamer the prompts first, then each step's new tokens; the prompts are not counted.
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.prompts_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompts_seen:
            self.progress.advance(value.numel())
        self.prompts_seen = True

    def end(self) -> None:
        """Nothing to flush: ``generate_all`` logs the end, an early one (every prompt at its EOS) included."""


@torch.inference_mode()
def _generate(model: torch.nn.Module, tokenizer: Any, prompt_ids: list[torch.Tensor], eos: list[int],
              max_new_tokens: int, streamer: BaseStreamer) -> list[Generation]:
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
    out = model.generate(input_ids=batch.to(device), attention_mask=mask.to(device), generation_config=config,
                         output_logits=True, return_dict_in_generate=True, streamer=streamer)
    best = [step.float().topk(2, dim=-1).values.tolist() for step in out.logits]  # per step: [B][2]
    top2 = [[(step[row][0], step[row][1]) for step in best] for row in range(len(prompt_ids))]
    return [_until_eos(seq[width:].tolist(), row_top2, eos, tokenizer) for seq, row_top2 in zip(out.sequences, top2)]


def _until_eos(new: list[int], top2: list[tuple[float, float]], eos: list[int], tokenizer: Any) -> Generation:
    """A row's new tokens up to and including its first end-of-sequence id (the batch pads after it)."""
    end = next((i + 1 for i, token in enumerate(new) if token in eos), len(new))
    return Generation(new[:end], tokenizer.decode(new[:end], skip_special_tokens=True), top2[:end])
