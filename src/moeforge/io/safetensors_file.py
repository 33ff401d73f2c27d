"""The safetensors file format at the byte level.

moeforge reads headers without touching tensor data (validation before any weight is read)
and writes shard files by streaming byte ranges from the source files, so a shard job never
materialises a model. The format: an 8-byte little-endian header length N, N bytes of JSON
(``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``), then the data
buffer, fully covered by the tensors with no holes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping

from moeforge.errors import ModelError
from moeforge.io.files import atomic_path
from moeforge.io.stream_write import StreamWriter

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
TORCH_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
SAFETENSORS_NAME = {v: k for k, v in TORCH_NAME.items()}
MAX_HEADER = 100_000_000
_CORRUPT = ("re-download the file; if the download is intact, the file is corrupt or was written by a broken "
            "tool: re-save it with the safetensors library")


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
    """Parse and check a safetensors header; returns (data start offset, entries). Reads no tensor data.

    The header is held to the safetensors library's own rules (see ``check_entries``), with the
    file's size as the end of the data buffer, so a truncated download or a header that points
    tensors at the wrong bytes is reported here, by name, rather than as a wrong model or a crash
    in a shard job hours later.
    """
    try:
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ValueError("file shorter than 8 bytes")
            (length,) = struct.unpack("<Q", raw_len)
            size = os.fstat(fh.fileno()).st_size
            if length > MAX_HEADER:
                raise ValueError(f"header length {length} is implausible (the limit is {MAX_HEADER})")
            if 8 + length > size:
                raise ValueError(f"header length {length} runs past the end of the file ({size} bytes)")
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read safetensors header: {exc}", str(path),
                         "re-download the file; it is truncated or not a safetensors file") from None
    entries = parse_entries(header, str(path))
    check_entries(entries, size - 8 - length, str(path))
    return 8 + length, entries


def parse_entries(header: object, where: str) -> dict[str, TensorEntry]:
    """The tensors of a parsed header (``__metadata__`` skipped); field values are judged by ``check_entries``."""
    if not isinstance(header, dict):
        raise ModelError("the safetensors header is not a JSON object", where, _CORRUPT)
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            entries[name] = TensorEntry(name, info["dtype"], tuple(info["shape"]), begin, end)
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"malformed header entry for tensor {name!r}", where, _CORRUPT) from None
    return entries


def check_entries(entries: Mapping[str, TensorEntry], data_len: int | None, where: str) -> None:
    """Refuse a header the safetensors library would refuse, from the header alone.

    A header is trusted to say which bytes are which tensor; a wrong one does not fail on
    reading, it silently yields a wrong model. So, as the library's own ``validate``: every dtype
    is known, shapes and offsets are non-negative integers, every tensor's byte range is exactly
    shape x item size, the ranges (sorted by start) tile the data buffer from byte 0 with no hole
    or overlap, and, where the buffer's length is known (``data_len``; None for Hub headers read
    without the file), the last range ends exactly at its end.
    """
    for entry in entries.values():
        _check_entry(entry, where)
    end, last = _check_layout(entries.values(), where)
    if data_len is not None:
        _check_buffer_end(end, last, data_len, where)


def _is_count(value: object) -> bool:
    """A JSON unsigned integer: the library parses shapes and offsets as usize, refusing 2.0, true and -1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(entry: TensorEntry, where: str) -> None:
    """One tensor on its own: known dtype, integer shape and offsets, a byte range of the right size."""
    if not isinstance(entry.dtype, str) or entry.dtype not in ITEMSIZE:
        raise ModelError(f"tensor {entry.name!r} has unknown or unsupported dtype {entry.dtype!r} "
                         f"(moeforge reads {', '.join(ITEMSIZE)})", where, _CORRUPT)
    if not all(map(_is_count, (*entry.shape, entry.begin, entry.end))):
        raise ModelError(f"tensor {entry.name!r} has shape {list(entry.shape)} and data_offsets "
                         f"{[entry.begin, entry.end]}: both must be non-negative integers", where, _CORRUPT)
    needed = math.prod(entry.shape) * ITEMSIZE[entry.dtype]
    if entry.end - entry.begin != needed:
        raise ModelError(f"tensor {entry.name!r} has data_offsets {[entry.begin, entry.end]} "
                         f"({entry.end - entry.begin} bytes), but shape {list(entry.shape)} of {entry.dtype} "
                         f"takes {needed} bytes", where, _CORRUPT)


def _check_layout(entries: Iterable[TensorEntry], where: str) -> tuple[int, TensorEntry | None]:
    """The byte ranges tile the buffer from 0; returns where they end and the tensor that ends there."""
    end, last = 0, None
    for entry in sorted(entries, key=lambda e: (e.begin, e.end, e.name)):
        if entry.begin != end:
            raise ModelError(_layout_fault(last, entry, end), where, _CORRUPT)
        end, last = entry.end, entry
    return end, last


def _layout_fault(last: TensorEntry | None, entry: TensorEntry, end: int) -> str:
    """Why ``entry`` does not start where the previous tensor (``last``, ending at ``end``) ends."""
    if last is None:
        return (f"the data buffer does not start with a tensor: bytes [0, {entry.begin}) before tensor "
                f"{entry.name!r} belong to no tensor")
    if entry.begin > end:
        return f"bytes [{end}, {entry.begin}) between tensors {last.name!r} and {entry.name!r} belong to no tensor"
    return f"tensors {last.name!r} {[last.begin, last.end]} and {entry.name!r} {[entry.begin, entry.end]} overlap"


def _check_buffer_end(end: int, last: TensorEntry | None, data_len: int, where: str) -> None:
    """The last tensor ends exactly at the end of the data buffer: nothing truncated, nothing unaccounted for."""
    after = f"the last tensor {last.name!r}" if last else "the header (it names no tensor)"
    if end > data_len:
        raise ModelError(f"file is truncated: {after} ends at byte {end} of the data buffer, which has "
                         f"{data_len} bytes", where, "re-download the file")
    if end < data_len:
        raise ModelError(f"{data_len - end} bytes after {after} belong to no tensor (the data buffer has "
                         f"{data_len} bytes, the tensors end at {end})", where, _CORRUPT)


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


def write_safetensors(path: Path, tensors: Iterable[OutTensor], metadata: dict[str, str] | None = None,
                      scan: Callable[[OutTensor, memoryview], object] | None = None) -> str:
    """Write a safetensors file atomically (see files.atomic_path); returns its sha256.

    Byte ranges of source files are read straight into the writer's buffer, computed tensors are
    produced one at a time, and the file is hashed as it is written (see stream_write); ``scan``
    sees every tensor's bytes, in pieces, on the way.
    """
    ordered = _aligned_order(tensors)
    sources: dict[Path, BinaryIO] = {}
    digest = hashlib.sha256()
    try:
        with atomic_path(path) as tmp:
            writer = StreamWriter(tmp, digest.update)
            try:
                writer.write(_header_bytes(ordered, metadata or {"format": "pt"}))
                for t in ordered:
                    _write_tensor(writer, t, sources, None if scan is None else partial(scan, t))
            except BaseException:
                writer.abort()
                raise
            writer.close()
    finally:
        for fh in sources.values():
            fh.close()
    return digest.hexdigest()


def _write_tensor(writer: StreamWriter, t: OutTensor, sources: dict[Path, BinaryIO],
                  scan: Callable[[memoryview], object] | None) -> None:
    if t.produce is not None:
        data = t.produce()
        if len(data) != t.nbytes:
            raise ValueError(f"{t.name}: produced {len(data)} bytes, expected {t.nbytes}")
        writer.write(data, scan)
        return
    assert t.src_path is not None
    src = sources.get(t.src_path) or sources.setdefault(t.src_path, open(t.src_path, "rb"))
    writer.copy_from(src, t.src_offset, t.nbytes, scan, on_short=lambda offset: ModelError(
        f"unexpected end of file at offset {offset}, inside the bytes of tensor {t.name!r}", src.name,
        "re-download the file"))


def shape_of(text: str) -> tuple[int, ...]:
    """A shape as inventory.tsv and plan.tensors.tsv write it ("4096,14336"), as a tuple."""
    return tuple(int(x) for x in text.split(",") if x)
