"""A causal LM held in 16 bits that computes in float32, one decoder layer upcast at a time.

A CPU's bfloat16 and float16 products depend on its instructions: with AVX512-BF16 or AMX torch runs
oneDNN's native kernels, without them its own, which round differently (and run 5 to 10 times
slower over a few dozen tokens). Greedy decoding amplifies such last-bit differences into other
tokens, so a smoke test computed in 16 bits would continue a prompt differently on different
machines. Computed in float32, from the same weights upcast exactly, it continues it as
transformers' ``generate`` does for the model loaded in float32, on every CPU.

A 16-bit model whose float32 copy would not fit stays in its own dtype (the memory the job asked
for); hooks give each decoder layer, the final norm and the output head float32 weights for the
length of their call and put the 16-bit ones back after it, so the float32 copy held at any time is
one module's. The input embedding is not upcast (a lookup is exact in any dtype); its output is.
"""

from __future__ import annotations

from typing import Any

import torch


def compute_in_float32(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` (a transformers causal LM, weights in any dtype) compute in float32 with its weights
    left as they are between calls; returns it."""
    base = model.base_model
    base.embed_tokens.register_forward_hook(lambda _module, _args, out: out.float())
    for module in (*base.layers, base.norm, model.get_output_embeddings()):
        _upcast_while_called(module)
    return model


def _upcast_while_called(module: torch.nn.Module) -> None:
    """Hooks that swap ``module``'s floating-point weights for float32 copies before its call and back after.

    The swap-back hook runs before any hook registered earlier (a streamed layer's release to the meta
    device), and also when the call raises, so the module leaves its call as it entered it.
    """
    held: dict[torch.nn.Parameter, torch.Tensor] = {}

    def upcast(loaded: torch.nn.Module, _args: Any) -> None:
        for param in loaded.parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                held[param] = param.data
                param.data = param.data.float()

    def restore(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
        for param, data in held.items():
            param.data = data
        held.clear()

    module.register_forward_pre_hook(upcast)
    module.register_forward_hook(restore, prepend=True, always_call=True)
