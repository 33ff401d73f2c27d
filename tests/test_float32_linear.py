"""The streamed passes' float32 products (moeforge.runtime.float32_linear): torch's numbers in the routers'
order, used where they apply, and the same wherever the weights lie."""

from __future__ import annotations

import pytest
import torch

from moeforge.runtime import float32_linear as fl
from moeforge.runtime.float32_linear import MIN_ROWS, weight_major_linear

F = torch.nn.functional


@pytest.fixture
def calls(monkeypatch) -> list[tuple[int, int]]:
    """(rows, output features) of every product computed as W·xᵀ."""
    seen: list[tuple[int, int]] = []
    real = fl.rows_times_weight

    def counting(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        seen.append((rows.shape[0], weight.shape[0]))
        return real(rows, weight)

    monkeypatch.setattr(fl, "rows_times_weight", counting)
    return seen


@pytest.mark.parametrize("shape", [(2, 7, 96), (9, 96), (5, 1, 96)])
def test_linear_equals_torchs_product_in_the_weight_major_order(calls, shape):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(*shape), torch.randn(300, 96), torch.randn(300)
    with torch.no_grad(), weight_major_linear():
        got = F.linear(x, weight, bias)
    rows = x.reshape(-1, 96)
    assert got.shape == (*shape[:-1], 300) and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got.reshape(-1, 300), torch.mm(weight, rows.t()).t() + bias)
    exact = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
    assert calls == [(rows.shape[0], 300)]


def test_16bit_operands_few_rows_and_gradients_keep_torchs_kernels(calls):
    """16-bit products are not these passes' (they compute in float32); a matrix-vector product and a
    product to differentiate are torch's."""
    layer = torch.nn.Linear(32, 16)
    with weight_major_linear():
        assert F.linear(torch.randn(MIN_ROWS - 1, 32), layer.weight.detach()).shape == (MIN_ROWS - 1, 16)
        assert F.linear(torch.randn(8, 32).bfloat16(), layer.weight.detach().bfloat16()).dtype == torch.bfloat16
        out = layer(torch.randn(8, 32))
    out.sum().backward()
    assert layer.weight.grad is not None and calls == []
    with torch.no_grad(), weight_major_linear():
        layer(torch.randn(8, 32))
    assert calls == [(8, 16)]


def test_the_same_weights_give_the_same_numbers_wherever_they_lie(calls):
    """A weight mapped from a safetensors file starts at any 4-byte offset; MKL's small products depend on
    the start modulo 16 bytes, so a bit-identical model in another file layout would compute other logits."""
    torch.manual_seed(3)
    weight, x = torch.randn(256, 64), torch.randn(9, 64)
    results = []
    for offset in range(4):
        buffer = torch.empty(weight.numel() + 4)
        placed = buffer[offset:offset + weight.numel()].view(256, 64)
        placed.copy_(weight)
        with torch.no_grad(), weight_major_linear():
            results.append(F.linear(x, placed))
    assert len(calls) == 4 and all(torch.equal(results[0], r) for r in results[1:])
