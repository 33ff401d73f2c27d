"""The next-token training loop and its reproducibility, shared by router training and the demo's models.

Training is reproducible byte for byte on one machine: seeded sampling, deterministic algorithms, and a
fixed thread count (a matrix product's summation order, and so its rounding, can depend on the number of
threads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from moeforge.io.progress import tracked


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


def sample_batch(streams: list[torch.Tensor], seq_len: int, batch_size: int, bos_id: int | None,
                 generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens, each from a stream chosen at random, at a random offset,
    after a bos (for a tokenizer that has one: Qwen's has none)."""
    prefix = torch.tensor([] if bos_id is None else [bos_id], dtype=torch.long)
    body = seq_len - len(prefix)
    rows = []
    for _ in range(batch_size):
        stream = streams[int(torch.randint(len(streams), (1,), generator=generator))]
        start = int(torch.randint(len(stream) - seq_len + 1, (1,), generator=generator))
        rows.append(torch.cat([prefix, stream[start:start + body]]))
    return torch.stack(rows)


def train(model: torch.nn.Module, streams: list[torch.Tensor], steps: int, lr: float, seq_len: int,
          batch_size: int, bos_id: int | None, seed: int, what: str) -> list[float]:
    """Next-token training of the parameters that require gradients, with AdamW and a linear decay; the loss
    at every step. ``what`` names it in the progress lines."""
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    losses = []
    for _ in tracked(range(steps), what, steps, "steps"):
        ids = sample_batch(streams, seq_len, batch_size, bos_id, generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
