"""Faster CPU matrix products for the forward passes moeforge runs (gates, smoke test, evaluation).

Every forward pass here multiplies a few dozen token rows by large weight matrices, and two
properties of torch's CPU kernels make the obvious call slow on machines without 16-bit arithmetic
(every AMD CPU before Zen 4, most Intel CPUs before Sapphire Rapids), measured on such a machine
(2 cores, torch 2.13 with MKL, 2048 x 8192 weights):

* ``F.linear(x, W)`` computes ``x @ W.T``, which MKL runs as a transposed product that does not
  parallelise for few rows; the same product computed as ``(W @ x.T).T`` ran 1.3-2.8x faster in
  float32 (a 128256-row output head, 9 rows: 332 ms -> 117 ms);
* a bfloat16 or float16 product without native instructions costs each token row a full pass over
  the weight (90 rows: 200 ms against 9 rows' 21 ms), so a prompt's prefill took most of a 1B-class
  smoke test. Upcasting the weight to float32 a few rows at a time (2 MiB, cache-sized) and
  multiplying as above took 42 ms for 90 rows and 9.5 ms for 9, with the weight kept in 16 bits.

:func:`cpu_matmul` applies both to ``F.linear`` and to the grouped product of transformers' fused
experts, inside a ``TorchFunctionMode``; the layer-streamed passes (``gates.layerwise``) and greedy
generation (``check.generation``) run under it, so the models stay transformers' own modules, computing
the same products with float32 accumulation (a 16-bit result is rounded once, as the native kernel
rounds it). Products of 1-3 rows (decoding a single prompt) keep the native kernels, which are
faster there, as does everything not on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch
from torch.overrides import TorchFunctionMode

#: CPU features (torch.cpu probes) that give a 16-bit dtype native arithmetic; without them torch
#: converts on the fly, and a bfloat16 matrix product measured 7 times slower than a float32 one.
_NATIVE_CPU_FEATURES = {"bfloat16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
                        "float16": ("_is_amx_fp16_supported",)}


def computes_natively(dtype: str, device: str) -> bool:
    """Whether ``device`` has arithmetic of its own for ``dtype``: always on accelerators; on a CPU, only
    with the instructions above (a torch without the probe counts as without them)."""
    if dtype not in _NATIVE_CPU_FEATURES or device != "cpu":
        return True
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in _NATIVE_CPU_FEATURES[dtype])


P = ParamSpec("P")
R = TypeVar("R")

#: Fewer rows than this keep the native kernel (a 16-bit matrix-vector product is faster as it is).
MIN_ROWS = 4
#: Bytes of float32 weight rows upcast at a time: small enough to stay in cache while multiplied.
UPCAST_BYTES = 2 << 20
_MKL_ALIGNMENT = 16
_SIXTEEN_BIT = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@functools.cache
def _upcast(dtype: torch.dtype) -> bool:
    """Whether products of ``dtype`` weights are computed from float32 copies of a few rows at a time (the
    CPU's features do not change, so each dtype is asked once, not on every product)."""
    return dtype in _SIXTEEN_BIT and not computes_natively(_SIXTEEN_BIT[dtype], "cpu")


def _applies(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """CPU operands of one floating dtype (or 16-bit weights without native arithmetic), enough rows, and
    nothing to differentiate (these products are for inference only)."""
    if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
        return False
    if rows.device.type != "cpu" or weight.device.type != "cpu" or rows.dtype != weight.dtype:
        return False
    if rows.dim() == 0 or rows.numel() // max(rows.shape[-1], 1) < MIN_ROWS:
        return False
    return weight.dtype == torch.float32 or _upcast(weight.dtype)


def rows_times_weight(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows @ weight.T`` for 2-D ``rows`` [M, K] and ``weight`` [N, K], computed as ``(weight @ rows.T).T``;
    16-bit weights are multiplied in float32, a few rows of them at a time, and the result rounded back.

    MKL's result for a small float32 ``weight @ rows.T`` depends on where ``weight`` starts modulo 16 bytes,
    and a tensor mapped straight from a safetensors file starts anywhere; such a weight is copied first
    (torch aligns what it allocates), so the same weights give the same numbers wherever they lie: a
    rebuilt merge and the published one it matches bit for bit then agree exactly.
    """
    if weight.dtype == torch.float32:
        if weight.data_ptr() % _MKL_ALIGNMENT:
            weight = weight.clone()
        return torch.mm(weight, rows.t()).t().contiguous()
    columns = rows.float().t()
    out = torch.empty(weight.shape[0], rows.shape[0], dtype=torch.float32, device=rows.device)
    step = max(1, UPCAST_BYTES // (4 * weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        torch.mm(weight[start:start + step].float(), columns, out=out[start:start + step])
    return out.t().contiguous().to(rows.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` through :func:`rows_times_weight`."""
    out = rows_times_weight(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def _grouped(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` of 2-D ``mat_a`` [S, K] with 3-D ``mat_b`` [G, K, N]: rows ``offs[g-1]:offs[g]``
    times group ``g``'s matrix, rows past the last offset zero. ``mat_b`` is the transpose of stored
    [G, N, K] experts, as transformers passes them, so each group is a :func:`rows_times_weight`."""
    out = torch.zeros(mat_a.shape[0], mat_b.shape[2], dtype=mat_a.dtype, device=mat_a.device)
    start = 0
    for group, end in enumerate(offs.tolist()):
        if end > start:
            weight = mat_b[group].t()
            rows = mat_a[start:end]
            out[start:end] = (rows_times_weight(rows, weight) if end - start >= MIN_ROWS
                              else torch.nn.functional.linear(rows, weight))
        start = end
    return out


class _CpuMatmul(TorchFunctionMode):
    """Routes ``F.linear`` and ``torch._grouped_mm`` through the products above where they apply."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2 and _applies(args[0], args[1]):
            return _linear(*args, **kwargs)
        if (func is torch._grouped_mm and len(args) == 2 and args[0].dim() == 2 and args[1].dim() == 3
                and kwargs.get("offs") is not None and kwargs.get("bias") is None and kwargs.get("out_dtype") is None
                and _applies(args[0], args[1])):
            return _grouped(args[0], args[1], kwargs["offs"])
        return func(*args, **kwargs)


def cpu_matmul() -> TorchFunctionMode:
    """A context manager under which the forward passes' matrix products take the faster CPU paths."""
    return _CpuMatmul()


def with_cpu_matmul(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` run under :func:`cpu_matmul` (a fresh mode each call, so calls may nest)."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with cpu_matmul():
            return function(*args, **kwargs)

    return wrapper
