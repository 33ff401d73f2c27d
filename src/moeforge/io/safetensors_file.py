"""The safetensors file format at the byte level.

moeforge reads headers without touching tensor data (validation before any weight is read)
and writes shard files by streaming byte ranges from the source files, so a shard job never
materialises a model. The format: an 8-byte little-endian header length N, N bytes of JSON
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``), then the data
buffer, fully covered by the tensors with no holes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from moeforge.errors import ModelError
from moeforge.io.files import atomic_path

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
SAFETENSORS_NAME = {v: k for k, v in TORCH_NAME.items()}
MAX_HEADER = 100_000_000
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorEntry:
    """A tensor's place in a safetensors file (``file``: which one, in a model's inventory)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    file: str = ""

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[int, dict[str, TensorEntry]]:
    """Parse a safetensors header; returns (data start offset, entries). Reads no tensor data.

    The file's size is checked against the header so a truncated download is reported here,
    by name, rather than as a crash in a shard job hours later.
    """
    try:
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than 8 bytes")
            (length,) = struct.unpack("<Q", raw_len)
            if length > MAX_HEADER:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(fh.read(length))
            size = os.fstat(fh.fileno()).st_size
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read safetensors header: {exc}", str(path),
                         "re-download the file; it is truncated or not a safetensors file") from None
    header.pop("__metadata__", None)
    entries = {}
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            entries[name] = TensorEntry(name, info["dtype"], tuple(info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"malformed header entry for tensor {name!r}", str(path),
                             "re-download the file; its header is corrupt") from None
    data_len = max((e.end for e in entries.values()), default=0)
    if 8 + length + data_len > size:
        raise ModelError(f"file is truncated: header promises {8 + length + data_len} bytes, file has {size}",
                         str(path), "re-download the file")
    return 8 + length, entries


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: name, dtype (safetensors code), shape, and where its bytes come from.

    Exactly one source: a byte range of a file (streamed without decoding) or a callable that
    returns the bytes (for tensors that are computed: casts, noise, scales, gates).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    src_path: Path | None = None
    src_offset: int = 0
    produce: Callable[[], bytes] | None = None


def _aligned_order(tensors: Iterable[OutTensor]) -> list[OutTensor]:
    """Largest item size first (stable), so every tensor starts aligned to its item size."""
    return sorted(tensors, key=lambda t: -ITEMSIZE[t.dtype])


def _header_bytes(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, count: int) -> None:
    """Kernel-side copy where the platform has it, a buffered loop otherwise."""
    dst.flush()
    copy = getattr(os, "copy_file_range", None)
    while count > 0 and copy is not None:
        try:
            done = copy(src.fileno(), dst.fileno(), min(count, 1 << 30), offset)
        except OSError:
            break
        if done == 0:
            break
        offset, count = offset + done, count - done
    dst.seek(0, os.SEEK_END)
    src.seek(offset)
    while count > 0:
        chunk = src.read(min(count, _COPY_CHUNK))
        if not chunk:
            raise ModelError(f"unexpected end of file after offset {offset}", src.name, "re-download the file")
        dst.write(chunk)
        count -= len(chunk)


def write_safetensors(path: Path, tensors: Iterable[OutTensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (see fileio.atomic_path), streaming what can be streamed."""
    ordered = _aligned_order(tensors)
    sources: dict[Path, BinaryIO] = {}
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            out.write(_header_bytes(ordered, metadata or {"format": "pt"}))
            for t in ordered:
                if t.produce is not None:
                    data = t.produce()
                    if len(data) != t.nbytes:
                        raise ValueError(f"{t.name}: produced {len(data)} bytes, expected {t.nbytes}")
                    out.write(data)
                else:
                    assert t.src_path is not None
                    src = sources.get(t.src_path) or sources.setdefault(t.src_path, open(t.src_path, "rb"))
                    _copy_range(src, out, t.src_offset, t.nbytes)
    finally:
        for fh in sources.values():
            fh.close()


def shape_of(text: str) -> tuple[int, ...]:
    """A shape as inventory.tsv and plan.tensors.tsv write it ("4096,14336"), as a tuple."""
    return tuple(int(x) for x in text.split(",") if x)
