"""Find NaN and inf in a written shard, in the same pass that hashes it.

A NaN in one source expert otherwise surfaces only at the smoke test, as a model that generates
garbage, with nothing pointing at the file at fault. Each shard is read back once anyway (for
its sha256, from the page cache); this pass also looks at every float's exponent bits, which
needs no float decoding and no more memory than one read chunk. A non-finite value is then
traced to the plan row, source model and file it came from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moeforge.errors import BuildError, ModelError
from moeforge.io.safetensors_file import read_header

#: Exponent bits all set means inf or NaN, in every IEEE binary format (as unsigned-int views).
_EXPONENT = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
             "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80)}
_CHUNK = 64 << 20  # a multiple of every item size


def _nonfinite(chunk: bytes, dtype: str) -> int:
    if dtype not in _EXPONENT:
        return 0
    view, mask = _EXPONENT[dtype]
    bits = np.frombuffer(chunk, dtype=view)
    return int(np.count_nonzero((bits & view(mask)) == view(mask)))


def hash_and_scan(path: Path) -> tuple[str, dict[str, int]]:
    """sha256 of a safetensors file, and the count of non-finite values of each tensor that has any."""
    start, entries = read_header(path)
    digest = hashlib.sha256()
    bad: dict[str, int] = {}
    with open(path, "rb") as fh:
        digest.update(fh.read(start))
        for entry in sorted(entries.values(), key=lambda e: e.begin):
            left, count = entry.nbytes, 0
            while left:
                chunk = fh.read(min(_CHUNK, left))
                if not chunk:
                    raise BuildError("shard file ended early while hashing", str(path), "rerun the shard job")
                digest.update(chunk)
                count += _nonfinite(chunk, entry.dtype)
                left -= len(chunk)
            if count:
                bad[entry.name] = count
        digest.update(fh.read())
    return digest.hexdigest(), bad


def _source_nonfinite(path: Path, name: str) -> int:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return int((~torch.isfinite(fh.get_tensor(name))).sum())


def blame_nonfinite(bad: Mapping[str, int], rows: list[Mapping[str, Any]], weight_dirs: Mapping[str, Path],
                    shard: Path) -> None:
    """Raise for the first non-finite output tensor, naming the source model and file when it came from one."""
    for target, count in bad.items():
        for row in (r for r in rows if r["target_name"] == target and r["source"] in weight_dirs):
            source_file = weight_dirs[row["source"]] / row["source_file"]
            found = _source_nonfinite(source_file, row["source_name"])
            if found:
                raise ModelError(f"source tensor {row['source_name']!r} of model {row['source']} holds {found} "
                                 f"NaN/inf value(s); output tensor {target} would carry them", str(source_file),
                                 "the source checkpoint is corrupt: re-download it, or fix or drop that model")
        raise BuildError(f"output tensor {target} holds {count} NaN/inf value(s) that are not in its source "
                         "tensors: a scale, noise or cast overflowed, or the router computation failed", str(shard),
                         "lower residual_scale/noise_scale, or use a dtype with a wider range (bfloat16, float32)")
