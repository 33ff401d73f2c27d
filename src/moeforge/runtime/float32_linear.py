"""The order in which the layer-streamed passes multiply float32 weights: ``(W·xᵀ)ᵀ``, not ``x·Wᵀ``.

The streamed passes (gates, the smoke test's comparison, evaluation) compute in float32 on every
device, one layer upcast at a time (``runtime.layerwise``), so none of their numbers depends on a
CPU's 16-bit instructions. Inside float32, the order of a product still shows in the last bits:
``F.linear(x, W)`` is ``x·Wᵀ``, which MKL sums in another order than ``W·xᵀ`` for a few rows (9 rows
of 2048 features: up to 1.2e-4 apart; from about 40 rows the two agree bit for bit). Every router
moeforge has built from hidden states was computed as ``(W·xᵀ)ᵀ``, and rebuilt merges must stay
byte-identical to earlier builds, so the passes keep that order: :func:`weight_major_linear` routes
``F.linear`` there, through a ``TorchFunctionMode``, the model staying transformers' own modules.
It is also the faster order for few rows on these CPUs (measured, 2 cores, MKL: 8192 x 2048 weight,
40 rows, 54 ms -> 29 ms; a 128256-row head, 9 rows, 461 ms -> 386 ms).

MKL's result for a small ``W·xᵀ`` also depends on where ``W`` starts modulo 16 bytes, and a tensor
mapped straight from a safetensors file starts anywhere: such a weight is copied first (torch aligns
what it allocates), so the same weights give the same numbers wherever they lie in a file.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch
from torch.overrides import TorchFunctionMode

P = ParamSpec("P")
R = TypeVar("R")

#: Products of fewer rows keep torch's kernel (the order the routers were computed in).
MIN_ROWS = 4
_MKL_ALIGNMENT = 16


def _applies(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """float32 CPU operands, enough rows, and nothing to differentiate (these passes only infer)."""
    if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
        return False
    if rows.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if rows.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    return rows.dim() > 0 and rows.numel() // max(rows.shape[-1], 1) >= MIN_ROWS


def rows_times_weight(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows @ weight.T`` for 2-D float32 ``rows`` [M, K] and ``weight`` [N, K], computed as
    ``(weight @ rows.T).T`` from an aligned ``weight``."""
    if weight.data_ptr() % _MKL_ALIGNMENT:
        weight = weight.clone()
    return torch.mm(weight, rows.t()).t().contiguous()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` through :func:`rows_times_weight`."""
    out = rows_times_weight(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


class _WeightMajorLinear(TorchFunctionMode):
    """Routes ``F.linear`` through :func:`rows_times_weight` where it applies."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2 and _applies(args[0], args[1]):
            return _linear(*args, **kwargs)
        return func(*args, **kwargs)


def weight_major_linear() -> TorchFunctionMode:
    """A context manager under which float32 ``F.linear`` computes ``(W·xᵀ)ᵀ``."""
    return _WeightMajorLinear()


def with_weight_major_linear(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` run under :func:`weight_major_linear` (a fresh mode each call, so calls may nest)."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with weight_major_linear():
            return function(*args, **kwargs)

    return wrapper
