"""The faster CPU products (moeforge.runtime.cpu_matmul) compute what torch's own compute, and are the ones used."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moeforge.runtime import cpu_matmul as cm
from moeforge.runtime.cpu_matmul import MIN_ROWS, computes_natively, cpu_matmul

F = torch.nn.functional
#: float32 products differ from torch's in the order of summation only; 16-bit ones in one rounding.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.fixture
def calls(monkeypatch) -> list[tuple[int, int]]:
    """(rows, output features) of every product the faster path computed."""
    seen: list[tuple[int, int]] = []
    real = cm.rows_times_weight

    def counting(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        seen.append((rows.shape[0], weight.shape[0]))
        return real(rows, weight)

    monkeypatch.setattr(cm, "rows_times_weight", counting)
    return seen


def _exact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product in float64: what both implementations approximate."""
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 7, 96), (9, 96), (5, 1, 96)])
def test_linear_equals_torchs_product(calls, dtype, shape):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(*shape, dtype=dtype), torch.randn(300, 96, dtype=dtype), torch.randn(300, dtype=dtype)
    with torch.no_grad(), cpu_matmul():
        got = F.linear(x, weight, bias)
    native = F.linear(x, weight, bias)
    assert got.shape == native.shape and got.dtype == dtype and got.is_contiguous()
    exact = _exact(x, weight, bias)
    scale = float(exact.abs().max())
    for result in (got, native):
        torch.testing.assert_close(result.double(), exact, rtol=0, atol=TOLERANCE[dtype] * scale)
    faster = dtype == torch.float32 or not computes_natively(str(dtype).removeprefix("torch."), "cpu")
    assert calls == ([(x.numel() // 96, 300)] if faster else [])


def test_few_rows_and_gradients_keep_torchs_kernels(calls):
    """A matrix-vector product is faster native; a product to differentiate is left to autograd."""
    layer = torch.nn.Linear(32, 16)
    with cpu_matmul():
        assert F.linear(torch.randn(MIN_ROWS - 1, 32), layer.weight.detach()).shape == (MIN_ROWS - 1, 16)
        out = layer(torch.randn(8, 32))
    out.sum().backward()
    assert layer.weight.grad is not None and calls == []
    with torch.no_grad(), cpu_matmul():
        layer(torch.randn(8, 32))
    assert calls == [(8, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_product_equals_torchs(calls, dtype):
    """Groups of many rows, of too few rows and of none; rows past the last offset come out zero."""
    torch.manual_seed(1)
    experts = torch.randn(4, 48, 64, dtype=dtype)  # [G, N, K] as stored; transformers passes the transpose
    rows = torch.randn(30, 64, dtype=dtype)
    offs = torch.tensor([6, 6, 8, 27], dtype=torch.int32)
    with torch.no_grad(), cpu_matmul():
        got = F.grouped_mm(rows, experts.transpose(-2, -1), offs=offs)
    native = F.grouped_mm(rows, experts.transpose(-2, -1), offs=offs)
    starts = [0, *offs.tolist()[:-1]]
    for group, (start, end) in enumerate(zip(starts, offs.tolist(), strict=True)):
        exact = _exact(rows[start:end], experts[group])
        scale = float(exact.abs().max()) if end > start else 1.0
        torch.testing.assert_close(got[start:end].double(), exact, rtol=0, atol=TOLERANCE[dtype] * scale)
        torch.testing.assert_close(native[start:end].double(), exact, rtol=0, atol=TOLERANCE[dtype] * scale)
    assert not got[27:].any()
    faster = dtype == torch.float32 or not computes_natively("bfloat16", "cpu")
    assert calls == ([(6, 48), (19, 48)] if faster else [])  # the 2-row group stays native


def test_a_transformers_moe_runs_through_them(calls):
    """transformers' own Mixtral (fused experts, router, head) under the mode: the same logits and greedy
    tokens as without it, its experts' grouped products and its linear layers computed here."""
    torch.manual_seed(2)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                           num_experts_per_tok=2, max_position_embeddings=64)
    model = MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 128, (3, 9))
    with torch.no_grad():
        native = model(input_ids=ids).logits
        with cpu_matmul():
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, native, rtol=0, atol=1e-5 * float(native.abs().max()))
    assert {features for _, features in calls} >= {2 * 96, 64, 128}  # experts' gate/up and down, attention, head
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        with cpu_matmul():
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False), tokens)


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
        with torch.no_grad(), cpu_matmul():
            results.append(F.linear(x, placed))
    assert len(calls) == 4 and all(torch.equal(results[0], r) for r in results[1:])
