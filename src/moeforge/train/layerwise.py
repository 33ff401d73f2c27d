"""``method: layerwise``: each layer's router fitted on the MoE's own router inputs, one layer at a time.

The model is streamed with the shared engine (``moeforge.runtime.layerwise.refit_layers``): layer ``i``'s
router sees the hidden states of the MoE whose routers below ``i`` are already trained, and only one layer's
weights are in memory, whatever the model's size; what grows with the settings is the windows' activations.

The objective is a linear classifier on the router input: route each token of an expert's text to that
expert (cross-entropy of the router logits against the text's expert, with ``label_smoothing``), full-batch
AdamW for ``steps`` steps from the gates' rows. docs/training.md gives the measurements it was chosen on:
without smoothing the routers grow confident enough to do worse than prompt routers on text of another style. Qwen2-MoE's shared
expert gate is a logistic classifier of the same inputs: its own texts against the routed experts'.
The first position of each window (the bos token, the same for every text) is left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moeforge.plan.recipe import RouterTraining
from moeforge.runtime.layerwise import CheckpointTensors, refit_layers, router_of, shared_gate_of
from moeforge.train.texts import TrainingWindows


def _fit(weight: torch.Tensor, features: torch.Tensor, target: torch.Tensor, settings: RouterTraining,
         binary: bool) -> tuple[torch.Tensor, list[float]]:
    """``weight`` trained on (features, target) full-batch; the trained weight and the loss at every step."""
    trained = weight.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([trained], lr=settings.learning_rate, weight_decay=0.0)
    smoothing = settings.label_smoothing
    losses = []
    for _ in range(settings.steps):
        logits = features @ trained.T
        if binary:
            soft = target.float() * (1 - smoothing) + smoothing / 2
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], soft)
        else:
            loss = torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return trained.detach(), losses


def accuracy(logits: torch.Tensor, target: torch.Tensor, groups: int) -> dict[str, Any]:
    """Top-1 routing accuracy: overall, and per gate row (None for a row without tokens)."""
    right = logits.argmax(-1) == target
    per = [float(right[target == g].float().mean()) if bool((target == g).any()) else None for g in range(groups)]
    return {"all": float(right.float().mean()), "per_expert": per}


class LayerwiseTrainer:
    """The ``refit`` of the streamed pass: fits each sparse layer's router in place and records what it did."""

    def __init__(self, windows: TrainingWindows, settings: RouterTraining, num_routed: int) -> None:
        self.settings = settings
        self.num_routed = num_routed
        tokens = windows.ids.shape[1] - 1
        self.group = windows.group.repeat_interleave(tokens)
        self.heldout = windows.heldout.repeat_interleave(tokens)
        self.trained: dict[str, torch.Tensor] = {}
        self.layers: list[dict[str, Any]] = []

    def __call__(self, index: int, layer: torch.nn.Module, mlp_in: list[torch.Tensor]) -> None:
        features = torch.cat([batch[:, 1:] for batch in mlp_in]).reshape(-1, mlp_in[0].shape[-1]).float().cpu()
        router = router_of(layer)
        routed = self.group < self.num_routed
        train, held = routed & ~self.heldout, routed & self.heldout
        with torch.enable_grad():
            weight, losses = _fit(router.weight.cpu(), features[train], self.group[train], self.settings, binary=False)
        record = {"layer": index, "losses": losses,
                  "heldout_before": accuracy(features[held] @ router.weight.float().cpu().T, self.group[held],
                                             self.num_routed),
                  "heldout_after": accuracy(features[held] @ weight.T, self.group[held], self.num_routed)}
        router.weight.data = weight.to(router.weight.device, router.weight.dtype)
        self.trained[f"layer.{index}.router"] = weight
        gate = shared_gate_of(layer)
        if gate is not None and int(self.group.max()) == self.num_routed:
            record["shared_gate"] = self._fit_shared(index, gate, features)
        self.layers.append(record)

    def _fit_shared(self, index: int, gate: torch.nn.Module, features: torch.Tensor) -> dict[str, Any]:
        """The shared expert's gate: its own texts' tokens (1) against the routed experts' (0)."""
        target = (self.group == self.num_routed).long()
        with torch.enable_grad():
            weight, losses = _fit(gate.weight.cpu(), features[~self.heldout], target[~self.heldout], self.settings,
                                  binary=True)
        held = self.heldout

        def right(w: torch.Tensor) -> float:
            return float((((features[held] @ w.float().T)[:, 0] > 0).long() == target[held]).float().mean())

        record = {"losses": losses, "heldout_before": right(gate.weight.cpu()), "heldout_after": right(weight)}
        gate.weight.data = weight.to(gate.weight.device, gate.weight.dtype)
        self.trained[f"layer.{index}.shared_expert_gate"] = weight
        return record


def train_layerwise(config_dir: Path, store: CheckpointTensors, windows: TrainingWindows,
                    settings: RouterTraining, num_routed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Every sparse layer's router (and shared gate) trained, bottom-up; the tensors under the gates file's names
    and one record per layer (loss per step, held-out accuracy before and after)."""
    trainer = LayerwiseTrainer(windows, settings, num_routed)
    batches = [(ids, torch.ones_like(ids)) for ids in windows.ids.split(settings.batch_size)]
    refit_layers(config_dir, store, batches, trainer, device=settings.device)
    return trainer.trained, trainer.layers
