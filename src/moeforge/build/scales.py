"""Refuse an expert matrix whose scale is implausible next to its base counterpart's, before a shard is written.

A safetensors header whose dtype was relabelled (float16 bytes declared bfloat16) passes every header
check (same item size, same byte length) and decodes to values of 1e-7 and less: the expert it builds is
near zero, and the smoke test passes, since the other experts and attention still work. A fine-tuned
expert's matrices stay within about 10 % of its base's in RMS (the demo's experts: 1.03 to 1.10 times), so
each expert matrix's RMS is compared with the base's same-named matrix (the plan row's ``scale_ref``).

Bounds: outside [1e-2, 1e2] the build stops. A float16 tensor read as bfloat16 lands six orders of
magnitude low (measured: RMS 3.5e-8 against the base's 0.089) and is refused whatever its values; the
reverse relabel (bfloat16 read as float16) reads every value near 0.5-2, about 1/RMS of the base (10-100 for
usual weights), so it is refused or warned about. The refusal bound stays at two orders of magnitude because
a model of another pretraining with the same shapes (allowed, with a warning, by validation) or a heavily
perturbed test model can be several times off without being broken. Outside [1/3, 3] a warning names the
tensor: no fine-tune of the base is that far off.

The RMS is estimated from a fixed sample of each tensor's bytes (evenly spaced blocks, the whole tensor
when it is small), so the check reads 256 KiB per matrix whatever the model's size (an RMS from 128K values
is within about 0.3 % of the whole tensor's), one tensor at a time, and gives the same numbers on every run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from moeforge.errors import ModelError
from moeforge.io.safetensors_file import ITEMSIZE, TensorEntry
from moeforge.plan.table import parse_scale_ref

log = logging.getLogger(__name__)

#: The RMS ratio (expert / base) outside which the build stops, and outside which it warns.
REFUSE_RATIO = 1e2
WARN_RATIO = 3.0
#: Bytes of each tensor that the RMS is estimated from: SAMPLE_BLOCKS evenly spaced blocks of this total.
SAMPLE_BYTES = 256 << 10
SAMPLE_BLOCKS = 16

#: (source slug, file, tensor name) -> (file path, absolute byte offset of the tensor's data, header entry).
Locate = Callable[[str, str, str], tuple[Path, int, TensorEntry]]


def _decode(raw: bytes, dtype: str) -> np.ndarray:
    """The float32 values of raw little-endian bytes of one float dtype (bfloat16 by widening its bits)."""
    if dtype == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, {"F16": np.float16, "F32": np.float32}[dtype]).astype(np.float32)


def sampled_rms(path: Path, offset: int, entry: TensorEntry) -> float:
    """The RMS of a tensor's values, from SAMPLE_BLOCKS evenly spaced blocks of its bytes (all of it when it is
    at most SAMPLE_BYTES). Non-finite values are left out: the NaN/inf scan reports them on its own."""
    item = ITEMSIZE[entry.dtype]
    with open(path, "rb") as fh:
        if entry.nbytes <= SAMPLE_BYTES:
            fh.seek(offset)
            raw = fh.read(entry.nbytes)
        else:
            block = SAMPLE_BYTES // SAMPLE_BLOCKS // item * item
            stride = (entry.nbytes - block) // (SAMPLE_BLOCKS - 1) // item * item
            parts = []
            for index in range(SAMPLE_BLOCKS):
                fh.seek(offset + index * stride)
                parts.append(fh.read(block))
            raw = b"".join(parts)
    values = _decode(raw, entry.dtype)
    total = float(np.dot(values, values))  # float32 is exact enough for a ratio judged in orders of magnitude
    if not math.isfinite(total):  # a square overflowed float32, or a value is NaN/inf: the slow, exact way
        values = values[np.isfinite(values)].astype(np.float64)
        total = float(np.dot(values, values))
    return math.sqrt(total / len(values)) if len(values) else 0.0


def _describe(row: Mapping[str, Any], base_name: str, expert_rms: float, base_rms: float) -> str:
    ratio = f"{expert_rms / base_rms:.3g}" if base_rms else "infinitely many"
    return (f"expert tensor {row['source_name']!r} of model {row['source']} has RMS {expert_rms:.3g}, {ratio} times "
            f"that of the base's {base_name!r} (RMS {base_rms:.3g})")


def check_expert_scales(rows: list[Mapping[str, Any]], locate: Locate) -> None:
    """Compare every expert row's source tensor with its base counterpart; stop at the first implausible one.

    One tensor pair is read at a time; a base tensor's RMS is remembered for the other experts of its layer.
    """
    base_rms: dict[str, float] = {}
    for row in rows:
        reference = parse_scale_ref(row.get("scale_ref", ""))
        if reference is None or row["transform"] == "zeros":
            continue
        if row["scale_ref"] not in base_rms:
            base_rms[row["scale_ref"]] = sampled_rms(*locate(*reference))
        path, offset, entry = locate(row["source"], row["source_file"], row["source_name"])
        expert, base = sampled_rms(path, offset, entry), base_rms[row["scale_ref"]]
        if base == 0.0:
            continue  # an all-zero base matrix gives no scale to compare with
        ratio = expert / base
        if not 1 / REFUSE_RATIO <= ratio <= REFUSE_RATIO:
            raise ModelError(f"{_describe(row, reference[2], expert, base)}: its values are implausible for a "
                             f"fine-tune of the base (the build stops outside 1/{REFUSE_RATIO:g} to {REFUSE_RATIO:g})",
                             str(path), f"a {entry.dtype} dtype in its safetensors header may be wrong (float16 bytes "
                             "labelled bfloat16, or the reverse): re-download or re-save the model, or drop it from "
                             "the recipe")
        if not 1 / WARN_RATIO <= ratio <= WARN_RATIO:
            log.warning("%s: %s; is it a fine-tune of the base?", path, _describe(row, reference[2], expert, base))
