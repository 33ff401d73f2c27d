"""``method: end_to_end``: the routers alone trained on next-token loss through the whole MoE.

Every other weight is frozen; the gradient reaches each router through the mixing weights of the
experts it selects, so the routers learn what lowers the loss of the whole model, not a proxy. The cost
is the whole model in memory (float32 weights, plus activations for the backward pass): refused before
any work when that exceeds the job's memory budget, with the numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from moeforge.errors import ModelError
from moeforge.memory_need import end_to_end_training_bytes
from moeforge.plan.recipe import RouterTraining
from moeforge.runtime.layerwise import CheckpointTensors, router_of, shared_gate_of, whole_model_of
from moeforge.runtime.memory_budget import gib, memory_budget
from moeforge.train.layerwise import accuracy
from moeforge.train.loop import train
from moeforge.train.texts import TrainingWindows


def needed_bytes(store: CheckpointTensors, config: Any, settings: RouterTraining) -> int:
    """Memory to train the routers through the whole model (``end_to_end_training_bytes``)."""
    weights = sum(4 * math.prod(entry.shape) for entry in store.entries().values())
    return end_to_end_training_bytes(weights, config.hidden_size, config.num_hidden_layers, config.vocab_size,
                                     settings.batch_size * settings.seq_len)


def check_memory(store: CheckpointTensors, config: Any, settings: RouterTraining, job_mem_mb: int | None) -> None:
    """Refuse, before any work, training that does not fit the memory budget; say both numbers."""
    need = needed_bytes(store, config, settings)
    budget = memory_budget(settings.memory_gb, job_mem_mb, rule="train_routers",
                           setting="router_training.memory_gb in the recipe")
    if not budget.allows(need):
        raise ModelError(
            f"router_training method end_to_end needs the whole model in memory: about {gib(need)}, over the "
            f"budget of {gib(budget.bound or 0)} ({budget.source})", "router_training.method",
            f"use method: layerwise (bounded by one layer at any size), or {budget.raise_how}")


def _routers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The trainable modules under the gates file's names: each sparse layer's router and shared gate."""
    found = {}
    for index, layer in enumerate(model.base_model.layers):
        if router_of(layer) is not None:
            found[f"layer.{index}.router"] = router_of(layer)
        if shared_gate_of(layer) is not None:
            found[f"layer.{index}.shared_expert_gate"] = shared_gate_of(layer)
    return found


@torch.no_grad()
def heldout_accuracy(model: torch.nn.Module, windows: TrainingWindows, num_routed: int, batch_size: int
                     ) -> list[dict[str, Any]]:
    """Top-1 routing accuracy of each sparse layer on the held-out windows' tokens (the bos left out)."""
    ids = windows.ids[windows.heldout]
    target = windows.group[windows.heldout].repeat_interleave(ids.shape[1] - 1)
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = []
    for chunk in ids.split(batch_size):
        out = model(input_ids=chunk.to(device), output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            if len(per_layer) <= layer:
                per_layer.append([])
            per_layer[layer].append(logits.reshape(*chunk.shape, -1)[:, 1:].reshape(-1, logits.shape[-1]).cpu())
    keep = target < num_routed
    return [accuracy(torch.cat(logits)[keep], target[keep], num_routed) for logits in per_layer]


def train_end_to_end(config_dir: Path, store: CheckpointTensors, windows: TrainingWindows, settings: RouterTraining,
                     num_routed: int, bos_id: int | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The routers trained through the whole model; the tensors under the gates file's names and the record
    (loss per step, held-out accuracy per sparse layer before and after)."""
    model = whole_model_of(config_dir, store, settings.device, torch.float32)
    routers = _routers(model)
    trainable = {id(m.weight) for m in routers.values()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    before = heldout_accuracy(model, windows, num_routed, settings.batch_size)
    train_ids = windows.ids[~windows.heldout][:, 0 if bos_id is None else 1:]
    train_group = windows.group[~windows.heldout]
    streams = [train_ids[train_group == g].reshape(-1) for g in range(len(windows.groups))]
    losses = train(model, streams, settings.steps, settings.learning_rate, settings.seq_len, settings.batch_size,
                   bos_id, settings.seed, "router training (end_to_end)")
    after = heldout_accuracy(model, windows, num_routed, settings.batch_size)
    tensors = {name: module.weight.detach().float().cpu() for name, module in routers.items()}
    return tensors, {"losses": losses, "heldout_before": before, "heldout_after": after}
