"""Execute the plan rows of one shard: stream bytes, transform only what must change.

A shard job knows no architecture: it reads rows (target, source file, byte range, transform)
and writes one safetensors file. Rows whose transform is ``copy`` are streamed from the source
file without decoding; only casts, noise and scales go through torch, one tensor at a time, so
a job's memory is bounded by its largest tensor, not by a model. torch is imported only when
such a row exists, which keeps pure-copy jobs fast to start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

from moeforge.build.finite import NonfiniteTally, blame_nonfinite
from moeforge.build.scales import check_expert_scales
from moeforge.errors import BuildError
from moeforge.io.fetch import weight_dirs_from
from moeforge.io.files import write_text
from moeforge.io.progress import MIB, Progress
from moeforge.io.safetensors_file import (
    ITEMSIZE,
    TORCH_NAME,
    OutTensor,
    TensorEntry,
    read_header,
    shape_of,
    write_safetensors,
)
from moeforge.plan.table import GATES_SOURCE, read_rows, tensor_shape


class _Headers:
    """Source file headers, read once per file per job."""

    def __init__(self, dirs: Mapping[str, Path], files: Mapping[str, Path]) -> None:
        self.dirs = dirs
        self.files = files
        self._cache: dict[Path, tuple[int, dict[str, TensorEntry]]] = {}

    def path(self, source: str, file: str) -> Path:
        """A model's file in its directory; a source the job is given as one file (the routers) is that file."""
        return self.files[source] if source in self.files else self.dirs[source] / file

    def entry(self, path: Path, name: str) -> tuple[int, TensorEntry]:
        if path not in self._cache:
            self._cache[path] = read_header(path)
        start, entries = self._cache[path]
        if name not in entries:
            raise BuildError(f"tensor {name!r} is not in the file", str(path),
                             "the weights changed since validation; rerun from fetch_metadata")
        return start, entries[name]

    def locate(self, source: str, file: str, name: str) -> tuple[Path, int, TensorEntry]:
        """A source tensor's file, the absolute offset of its data, and its header entry."""
        path = self.path(source, file)
        start, entry = self.entry(path, name)
        return path, start + entry.begin, entry


def _apply(transform: str, tensor: Any, dtype_out: str) -> Any:
    """Apply a row's transform chain in float32, then cast to the output dtype."""
    import torch

    work = tensor.to(torch.float32)
    for step in transform.split(";"):
        op, _, arg = step.partition(":")
        if op == "scale":
            work = work * float(arg)
        elif op == "noise":
            sigma, seed = arg.split("@")
            gen = torch.Generator().manual_seed(int(seed))
            work = work + torch.randn(work.shape, generator=gen, dtype=torch.float32) * float(sigma)
    return work.to(getattr(torch, TORCH_NAME[dtype_out])).contiguous()


def _tensor_bytes(tensor: Any) -> bytes:
    import torch

    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def _load(path: Path, name: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(name)


def _producer(path: Path, name: str, transform: str, dtype_out: str) -> Callable[[], bytes]:
    return lambda: _tensor_bytes(_apply(transform, _load(path, name), dtype_out))


def _checked_source(row: Mapping[str, Any], headers: _Headers) -> tuple[Path, int, TensorEntry]:
    """The row's source file and header entry, checked against what validation planned."""
    shape = shape_of(row["shape"])
    path = headers.path(row["source"], row["source_file"])
    start, entry = headers.entry(path, row["source_name"])
    if entry.shape != shape or entry.dtype != row["dtype_in"]:
        raise BuildError(f"tensor {row['source_name']!r} is {entry.dtype}{list(entry.shape)}, the plan expects "
                         f"{row['dtype_in']}{list(shape)}", str(path),
                         "the weights changed since validation; rerun from fetch_metadata")
    return path, start, entry


def _zeros(nbytes: int) -> Callable[[], bytes]:
    return lambda: bytes(nbytes)  # all-zero bytes are 0.0 in every float format


def _part_tensor(row: Mapping[str, Any], headers: _Headers) -> Any:
    """One part of a concatenated tensor, transformed, as a torch tensor in the output dtype."""
    import torch

    if row["transform"] == "zeros":
        return torch.zeros(shape_of(row["shape"]), dtype=getattr(torch, TORCH_NAME[row["dtype_out"]]))
    path, _, _ = _checked_source(row, headers)
    return _apply(row["transform"], _load(path, row["source_name"]), row["dtype_out"])


def _concat_producer(parts: list[Mapping[str, Any]], headers: _Headers) -> Callable[[], bytes]:
    import torch

    dim = int(parts[0]["concat_dim"])
    return lambda: _tensor_bytes(torch.cat([_part_tensor(p, headers) for p in parts], dim=dim).contiguous())


def _out_tensor(parts: list[Mapping[str, Any]], headers: _Headers) -> OutTensor:
    """One output tensor from its plan rows: streamed, zero-filled, computed, or concatenated."""
    row = parts[0]
    shape = tensor_shape(parts)
    nbytes = math.prod(shape) * ITEMSIZE[row["dtype_out"]]
    name, dtype = row["target_name"], row["dtype_out"]
    if len(parts) > 1:
        for part in parts:
            if part["transform"] != "zeros":
                _checked_source(part, headers)
        return OutTensor(name, dtype, shape, nbytes, produce=_concat_producer(parts, headers))
    if row["transform"] == "zeros":
        return OutTensor(name, dtype, shape, nbytes, produce=_zeros(nbytes))
    path, start, entry = _checked_source(row, headers)
    if row["transform"] == "copy":
        return OutTensor(name, dtype, shape, nbytes, src_path=path, src_offset=start + entry.begin)
    return OutTensor(name, dtype, shape, nbytes,
                     produce=_producer(path, row["source_name"], row["transform"], dtype))



def write_shard(rows: list[dict[str, str]], weight_dirs: Mapping[str, Path], gates_path: Path | None,
                out: Path) -> str:
    """Write one shard file from its plan rows; returns its sha256.

    The file is hashed as it is written (in parallel with the other shard jobs), so assembly need
    not read the whole model again for the lock file; the same pass refuses NaN/inf, naming the
    source model and file they came from. Before anything is written, each expert matrix's scale is
    compared with its base counterpart's (``check_expert_scales``).
    """
    if not rows:
        raise BuildError("no plan rows for this shard", str(out), "rerun the validate step")
    # The routers' file is named by the gates' key or is the merge's trained routers: the job is given it.
    headers = _Headers(weight_dirs, {} if gates_path is None else {GATES_SOURCE: gates_path})
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(row["target_name"], []).append(row)
    tensors = [_out_tensor(sorted(parts, key=lambda p: int(p["part"])), headers) for parts in grouped.values()]
    check_expert_scales(rows, headers.locate)
    tally = NonfiniteTally()
    progress = Progress(f"shard {out.stem}", round(sum(t.nbytes for t in tensors) / MIB, 1), "MiB written")

    def scan(tensor: OutTensor, piece: memoryview) -> None:
        tally.scan(tensor, piece)
        progress.advance(len(piece) / MIB)

    digest = write_safetensors(out, tensors, {"format": "pt"}, scan=scan)
    if tally.bad:
        out.unlink()
        blame_nonfinite(tally.bad, rows, weight_dirs, out)
    return digest


def shard_step(plan_tsv: Path, shard: str, weight_records: list[Path], gates_path: Path | None, out: Path,
               out_digest: Path) -> str:
    """The shard step: one shard file and its sha256 beside it."""
    return rows_step(read_rows(plan_tsv, shard), weight_records, gates_path, out, out_digest)


def rows_step(rows: list[dict[str, str]], weight_records: list[Path], gates_path: Path | None, out: Path,
              out_digest: Path) -> str:
    """The shard step from its plan rows as given: a shard keyed by what it holds gets them from the workflow,
    not from one merge's plan.tensors.tsv, so no merge's files are its inputs."""
    digest = write_shard(rows, weight_dirs_from(weight_records), gates_path, out)
    write_text(out_digest, digest + "\n")
    return digest
