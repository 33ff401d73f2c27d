"""``method: layerwise``: each layer's router fitted on the MoE's own router inputs, one layer at a time.

The model is streamed with the shared engine (``moeforge.runtime.layerwise.refit_layers``): layer ``i``'s
router sees the hidden states of the MoE whose routers below ``i`` are already trained, and only one layer's
weights are in memory, whatever the model's size; what grows with the settings is the windows' activations.

The objective is a linear classifier on the router input: route each token of an expert's text to that
expert, full-batch AdamW for ``steps`` steps from the gates' rows. Its loss mixes two terms
(``TOP_K_WEIGHT``): the cross-entropy of the router logits against the text's expert, with
``label_smoothing``, and the negative log of the weight the MoE really gives the text's expert, its softmax
probability renormalised over the ``experts_per_token`` it selects where the model renormalises (Mixtral,
``norm_topk_prob``). The first caps the routers' confidence: without smoothing they do worse than prompt
routers on text of another style. The second spends the rest on what the MoE computes: a token whose expert
is already in its top-k is pushed towards that expert's share of the mixture, not towards a margin over
experts that take no part in it. docs/training.md gives the measurements both were chosen on. Qwen2-MoE's
shared expert gate is a logistic classifier of the same inputs: its own texts against the routed experts'.
The first position of each window (the bos token, the same for every text) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeforge.plan.recipe import RouterTraining
from moeforge.runtime.layerwise import CheckpointTensors, load_config, refit_layers, router_of, shared_gate_of
from moeforge.train.texts import TrainingWindows

#: The share of the layerwise loss that is the MoE's top-k mixing weight of the text's expert (the rest is the
#: smoothed cross-entropy). On the demo 0.3 lowers every domain's held-out perplexity ratio (worst 1.081 ->
#: 1.074) while the routers still beat prompt routers on restyled text; more trades the latter for the former.
TOP_K_WEIGHT = 0.3


@dataclass(frozen=True)
class Mixing:
    """How the MoE mixes a token's experts: the ``top_k`` it selects, and whether their softmax probabilities
    are renormalised to sum to one (Mixtral always; Qwen MoE where ``norm_topk_prob`` is set)."""

    top_k: int
    renormalise: bool

    @classmethod
    def of(cls, config: Any) -> Mixing:
        return cls(int(config.num_experts_per_tok), bool(getattr(config, "norm_topk_prob", True)))

    def expert_nll(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean negative log of the weight the MoE gives each token's ``target`` expert. A target outside the
        top-k gets no weight at all; its softmax probability stands in, so the gradient still raises it."""
        log_probs = logits.log_softmax(-1)
        own = log_probs.gather(-1, target[:, None])[:, 0]
        if not self.renormalise:
            return -own.mean()
        top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices
        selected = (top == target[:, None]).any(-1)
        return -torch.where(selected, own - log_probs.gather(-1, top).logsumexp(-1), own).mean()


def _fit(weight: torch.Tensor, features: torch.Tensor, target: torch.Tensor, settings: RouterTraining,
         mixing: Mixing | None) -> tuple[torch.Tensor, list[float]]:
    """``weight`` trained on (features, target) full-batch; the trained weight and the loss at every step.
    ``mixing`` None: a binary gate (the shared expert's); else a router whose top-k mixing enters the loss."""
    trained = weight.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([trained], lr=settings.learning_rate, weight_decay=0.0)
    smoothing = settings.label_smoothing
    losses = []
    for _ in range(settings.steps):
        logits = features @ trained.T
        if mixing is None:
            soft = target.float() * (1 - smoothing) + smoothing / 2
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], soft)
        else:
            loss = ((1 - TOP_K_WEIGHT) * torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)
                    + TOP_K_WEIGHT * mixing.expert_nll(logits, target))
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

    def __init__(self, windows: TrainingWindows, settings: RouterTraining, num_routed: int, mixing: Mixing) -> None:
        self.settings = settings
        self.num_routed = num_routed
        self.mixing = mixing
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
            weight, losses = _fit(router.weight.cpu(), features[train], self.group[train], self.settings,
                                   self.mixing)
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
                                  None)
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
    trainer = LayerwiseTrainer(windows, settings, num_routed, Mixing.of(load_config(config_dir)))
    batches = [(ids, torch.ones_like(ids)) for ids in windows.ids.split(settings.batch_size)]
    refit_layers(config_dir, store, batches, trainer, device=settings.device)
    return trainer.trained, trainer.layers
