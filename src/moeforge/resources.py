"""Resource requests of the workflow's jobs, derived from plan.json (the single truth).

Imported by the workflow at parse time: no torch, no pandas. Before the validate checkpoint
has run (a dry run) there is no plan, and each request falls back to its floor.
"""

from __future__ import annotations

from typing import Any, Mapping

from moeforge.io.safetensors_file import ITEMSIZE, TORCH_NAME
from moeforge.memory_budget import whole_model_mb

#: Above this float32 footprint the smoke test runs in the model's own dtype ("auto").
FLOAT32_SMOKE_LIMIT = 8 << 30
MIB = 2**20
#: The evaluation streams its windows in chunks whose float32 logits stay under this size.
EVAL_LOGITS_CHUNK_BYTES = 256 * MIB


def smoke_dtype(plan: Mapping[str, Any], requested: str) -> str:
    """float32 when it fits comfortably (exact identity check), else the model's 16-bit dtype."""
    if requested != "auto":
        return requested
    size = sum(plan["shard_bytes"].values())
    itemsize = ITEMSIZE[plan["dtype_out"]]
    return "float32" if size * 4 // itemsize <= FLOAT32_SMOKE_LIMIT else TORCH_NAME[plan["dtype_out"]]


def shard_mem_mb(plan: Mapping[str, Any] | None, shard: str) -> int:
    """A shard job holds one transformed tensor at a time plus copy buffers: scale with the shard."""
    if not plan:
        return 500
    return int(500 + 2 * plan["shard_bytes"].get(shard, 0) / MIB / max(1, plan["num_experts"]))


def smoke_mem_mb(plan: Mapping[str, Any] | None, requested_dtype: str) -> int:
    """Enough for greedy generation, which loads one whole model at a time in float32 or its own dtype
    (see smoke_dtype); the rest of the smoke test runs one layer at a time, and generation is skipped
    when a smaller request is granted (see moeforge.memory_budget)."""
    if not plan:
        return 2000
    size = sum(plan["shard_bytes"].values())
    dtype = smoke_dtype(plan, requested_dtype)
    return whole_model_mb(size * (4 if dtype == "float32" else 2) // ITEMSIZE[plan["dtype_out"]])


def layer_mem_mb(plan: Mapping[str, Any] | None) -> int:
    """Layer-streamed jobs (gates) hold about one layer at a time, in float32."""
    largest = max(plan["shard_bytes"].values()) if plan else 0
    return int(2000 + 3 * largest / MIB)


def eval_mem_mb(plan: Mapping[str, Any] | None) -> int:
    """Layer-streamed like the gates, plus one chunk of logits and its float64 log-softmax."""
    return layer_mem_mb(plan) + 3 * EVAL_LOGITS_CHUNK_BYTES // MIB


def reproduce_mem_mb(plan: Mapping[str, Any] | None) -> int:
    """The comparison holds one tensor of each model: the largest is an embedding (in globals) or one expert's
    matrix (a layer shard over its experts)."""
    if not plan:
        return 1000
    layers = [v for k, v in plan["shard_bytes"].items() if k != "globals"]
    largest = max([plan["shard_bytes"].get("globals", 0), *(v / max(1, plan["num_experts"]) for v in layers)])
    return int(1000 + 2.5 * largest / MIB)
