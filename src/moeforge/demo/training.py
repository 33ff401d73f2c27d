"""Train the demo's tiny base and its domain experts, seeded, on the CPU, in seconds.

A frankenMoE only makes sense when its experts differ in what they are good at. Noise-perturbed
copies of one model are not: whatever the routers do, every expert is as good as every other. So
the demo base is first pre-trained on a mix of every domain's train split (it learns the tokens,
attention and a general MLP), then each expert is the base with only its MLP fine-tuned on one
domain. Attention, norms and embeddings stay the base's, exactly what a merge takes from the base,
so an MoE that routes each domain's tokens to that domain's expert computes that expert's model.

Training is reproducible byte for byte on one machine (``moeforge.train.loop``): seeded sampling and
initialisation, deterministic algorithms, and a fixed thread count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moeforge.demo.tiny_models import MLP_MATRIX
from moeforge.io.domains import DOMAINS, domain_text
from moeforge.train.loop import train


@dataclass(frozen=True)
class TrainingPlan:
    """How long and how hard to train; the defaults are sized for one CPU core.

    ``seq_len`` counts the bos token each training sequence starts with, as each evaluation window
    does. Pre-training uses ``pretrain_steps`` batches drawn from every domain; each expert then
    gets ``finetune_steps`` batches of its own domain.
    """

    seed: int = 0
    seq_len: int = 64
    batch_size: int = 16
    pretrain_steps: int = 200
    finetune_steps: int = 80
    pretrain_lr: float = 1e-2
    finetune_lr: float = 1e-2
    threads: int = 1


def domain_tokens(tokenizer_dir: Path) -> dict[str, torch.Tensor]:
    """Each domain's train split as one stream of token ids (no special tokens)."""
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    return {d: torch.tensor(tokenizer.encode(domain_text(d, "train")).ids, dtype=torch.long) for d in DOMAINS}


def pretrain(model: torch.nn.Module, tokens: dict[str, torch.Tensor], plan: TrainingPlan, bos_id: int) -> None:
    """Train every parameter on batches drawn from all domains alike."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    train(model, [tokens[d] for d in DOMAINS], plan.pretrain_steps, plan.pretrain_lr, plan.seq_len, plan.batch_size,
          bos_id, plan.seed, "pretraining the demo base")


def finetune_mlp(model: torch.nn.Module, stream: torch.Tensor, plan: TrainingPlan, bos_id: int, seed: int,
                 expert: str) -> None:
    """Train only the MLP matrices on one domain; everything a merge takes from the base stays as it is.
    ``expert``: its name, for the progress lines."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(bool(MLP_MATRIX.match(name)))
    train(model, [stream], plan.finetune_steps, plan.finetune_lr, plan.seq_len, plan.batch_size, bos_id,
          seed, f"fine-tuning {expert}")
