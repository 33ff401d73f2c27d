"""Train the demo's tiny base and its domain experts, seeded, on the CPU, in seconds.

A frankenMoE only makes sense when its experts differ in what they are good at. Noise-perturbed
copies of one model are not: whatever the routers do, every expert is as good as every other. So
the demo base is first pre-trained on a mix of every domain's train split (it learns the tokens,
attention and a general MLP), then each expert is the base with only its MLP fine-tuned on one
domain. Attention, norms and embeddings stay the base's, exactly what a merge takes from the base,
so an MoE that routes each domain's tokens to that domain's expert computes that expert's model.

Training is reproducible byte for byte on one machine: seeded sampling and initialisation,
deterministic algorithms, and a fixed thread count (a matrix product's summation order, and so its
rounding, can depend on the number of threads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moeforge.demo.tiny_models import MLP_MATRIX
from moeforge.io.domains import DOMAINS, domain_text
from moeforge.io.progress import tracked


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


@contextlib.contextmanager
def reproducible(threads: int) -> Iterator[None]:
    """Deterministic kernels on a fixed number of threads; the caller's settings restored afterwards."""
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(saved_deterministic)
        torch.set_num_threads(saved_threads)


def domain_tokens(tokenizer_dir: Path) -> dict[str, torch.Tensor]:
    """Each domain's train split as one stream of token ids (no special tokens)."""
    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    return {d: torch.tensor(tokenizer.encode(domain_text(d, "train")).ids, dtype=torch.long) for d in DOMAINS}


def sample_batch(streams: list[torch.Tensor], plan: TrainingPlan, bos_id: int | None,
                 generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows, each from a stream chosen at random, at a random offset, after a bos (for a
    tokenizer that has one: Qwen's has none)."""
    prefix = torch.tensor([] if bos_id is None else [bos_id], dtype=torch.long)
    body = plan.seq_len - len(prefix)
    rows = []
    for _ in range(plan.batch_size):
        stream = streams[int(torch.randint(len(streams), (1,), generator=generator))]
        start = int(torch.randint(len(stream) - plan.seq_len + 1, (1,), generator=generator))
        rows.append(torch.cat([prefix, stream[start:start + body]]))
    return torch.stack(rows)


def train(model: torch.nn.Module, streams: list[torch.Tensor], steps: int, lr: float, plan: TrainingPlan,
          bos_id: int | None, seed: int, what: str) -> list[float]:
    """Next-token training of the parameters that require gradients, with AdamW and a linear decay; the loss
    at every step. ``what`` names it in the progress lines (the demo's four trainings take most of its first
    minute)."""
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    losses = []
    for _ in tracked(range(steps), what, steps, "steps"):
        ids = sample_batch(streams, plan, bos_id, generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def pretrain(model: torch.nn.Module, tokens: dict[str, torch.Tensor], plan: TrainingPlan, bos_id: int) -> None:
    """Train every parameter on batches drawn from all domains alike."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    train(model, [tokens[d] for d in DOMAINS], plan.pretrain_steps, plan.pretrain_lr, plan, bos_id, plan.seed,
          "pretraining the demo base")


def finetune_mlp(model: torch.nn.Module, stream: torch.Tensor, plan: TrainingPlan, bos_id: int, seed: int,
                 expert: str) -> None:
    """Train only the MLP matrices on one domain; everything a merge takes from the base stays as it is.
    ``expert``: its name, for the progress lines."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(bool(MLP_MATRIX.match(name)))
    train(model, [stream], plan.finetune_steps, plan.finetune_lr, plan, bos_id, seed, f"fine-tuning {expert}")
