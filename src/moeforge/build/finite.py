"""Find NaN and inf in a shard as it is written, in the same pass that hashes it.

A NaN in one source expert otherwise surfaces only at the smoke test, as a model that generates
garbage, with nothing pointing at the file at fault. Every byte of a shard passes the writer's
buffer once (where it is also hashed); this scan looks at every float's exponent bits there,
which needs no float decoding and no more memory than one buffer. A non-finite value is then
traced to the plan row, source model and file it came from. Files already written (``verify``'s
check of a model built elsewhere) are read in chunks and scanned the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

from moeforge.errors import BuildError, ModelError
from moeforge.io.safetensors_file import OutTensor, TensorEntry, read_header

#: Bits that, all set, make a value inf or NaN (as unsigned-int views): the exponent in every IEEE
#: binary format; float8 E4M3 has no inf, and its one NaN pattern is exponent and mantissa all set.
_NONFINITE_BITS = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
                   "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
                   "F8_E5M2": (np.uint8, 0x7C), "F8_E4M3": (np.uint8, 0x7F)}
_CHUNK = 16 << 20  # a multiple of every item size; buffers of this size are reused


class _ChunkReader:
    """Reads a file in chunks into one reused buffer, and counts a chunk's non-finite values with reused
    scratch arrays: a fresh allocation per chunk costs page faults comparable to the scan itself."""

    def __init__(self) -> None:
        self.buffer = bytearray(_CHUNK)
        self.scratch: dict[type, tuple[np.ndarray, np.ndarray]] = {}

    def read(self, fh: BinaryIO, size: int) -> memoryview:
        """The next ``size`` (<= _CHUNK) bytes of ``fh``; shorter at the end of the file."""
        view = memoryview(self.buffer)[:size]
        got = fh.readinto(view)
        return view[:got]

    def nonfinite(self, chunk: memoryview, dtype: str) -> int:
        if dtype not in _NONFINITE_BITS:
            return 0
        kind, mask = _NONFINITE_BITS[dtype]
        bits = np.frombuffer(chunk, dtype=kind)
        if kind not in self.scratch:
            self.scratch[kind] = (np.empty(_CHUNK // np.dtype(kind).itemsize, kind),
                                  np.empty(_CHUNK // np.dtype(kind).itemsize, bool))
        masked, hits = (a[:len(bits)] for a in self.scratch[kind])
        np.bitwise_and(bits, kind(mask), out=masked)
        np.equal(masked, kind(mask), out=hits)
        return int(np.count_nonzero(hits))


class NonfiniteTally:
    """Non-finite values per tensor, counted from the pieces a writer shows (see write_safetensors' scan)."""

    def __init__(self) -> None:
        self.reader = _ChunkReader()
        self.bad: dict[str, int] = {}

    def scan(self, tensor: OutTensor, piece: memoryview) -> None:
        count = self.reader.nonfinite(piece, tensor.dtype)
        if count:
            self.bad[tensor.name] = self.bad.get(tensor.name, 0) + count


def _count_tensor(fh: BinaryIO, entry: TensorEntry, path: Path, consume: Callable[[memoryview], Any],
                  reader: _ChunkReader) -> int:
    """Non-finite values of the tensor at the file's position, read in bounded chunks, each passed on."""
    left, count = entry.nbytes, 0
    while left:
        chunk = reader.read(fh, min(_CHUNK, left))
        if not chunk:
            raise BuildError(f"file ended inside tensor {entry.name}", str(path), "rebuild or re-download it")
        consume(chunk)
        count += reader.nonfinite(chunk, entry.dtype)
        left -= len(chunk)
    return count


def nonfinite_counts(path: Path, consume: Callable[[memoryview], Any] = lambda chunk: None) -> dict[str, int]:
    """Non-finite values of each tensor of a safetensors file that has any, reading the file once.

    Every byte of the file goes through ``consume`` in order, so a caller can hash in the same pass;
    a chunk is valid only during the call (its buffer is reused).
    """
    start, entries = read_header(path)
    bad: dict[str, int] = {}
    reader = _ChunkReader()
    with open(path, "rb") as fh:
        consume(fh.read(start))
        for entry in sorted(entries.values(), key=lambda e: e.begin):
            count = _count_tensor(fh, entry, path, consume, reader)
            if count:
                bad[entry.name] = count
        consume(fh.read())
    return bad


def _source_nonfinite(path: Path, name: str) -> int:
    """Non-finite values of one tensor of a source file (the other tensors are not read)."""
    start, entries = read_header(path)
    with open(path, "rb") as fh:
        fh.seek(start + entries[name].begin)
        return _count_tensor(fh, entries[name], path, lambda chunk: None, _ChunkReader())


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
