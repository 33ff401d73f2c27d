"""What a job holds in memory, from a model's shapes: a whole model loaded as the smoke test loads it, and router
training through the whole model. The rules' ``mem_mb`` requests (moeforge.resources), the jobs' own checks
(moeforge.runtime, moeforge.train) and validation (moeforge.plan.training_memory) read the same figures.
"""

from __future__ import annotations

from moeforge.io.progress import MIB


def whole_model_mb(weight_bytes: int) -> int:
    """Memory to load one whole model and generate with it, in MiB, for weights of ``weight_bytes``.

    The smoke test loads the model one module at a time and keeps it, so beside the weights there is
    only one module's conversion copy at a time (a tenth covers it: a 1B-class MoE, 6.8 GiB of
    weights, peaked at 7.7 GiB while loading), and torch, the tokenizer and the generation buffers
    take about 2 GB. The smoke job's mem_mb request is this figure, so a budget read from that
    request fits generation exactly.
    """
    return int(2000 + 1.1 * weight_bytes / MIB)


#: Bytes of activations kept for the backward pass, per token, per decoder layer and hidden unit (float32
#: attention and MLP intermediates, the experts' outputs); a generous bound, as a kill is worse than a refusal.
_TRAINING_ACTIVATION_BYTES = 4 * 24


def end_to_end_training_bytes(float32_weight_bytes: int, hidden_size: int, num_layers: int, vocab_size: int,
                              batch_tokens: int) -> int:
    """Memory to train the routers through the whole model: its weights in float32, loaded as the smoke test
    loads them (``whole_model_mb``), and one batch's activations and logits kept for the backward pass."""
    activations = batch_tokens * (_TRAINING_ACTIVATION_BYTES * hidden_size * num_layers + 3 * 4 * vocab_size)
    return whole_model_mb(float32_weight_bytes) * MIB + activations
