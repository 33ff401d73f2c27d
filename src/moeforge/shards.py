"""Execute the plan rows of one shard: stream bytes, transform only what must change.

A shard job knows no architecture: it reads rows (target, source file, byte range, transform)
and writes one safetensors file. Rows whose transform is ``copy`` are streamed from the source
file without decoding; only casts, noise and scales go through torch, one tensor at a time, so
a job's memory is bounded by its largest tensor, not by a model. torch is imported only when
such a row exists, which keeps pure-copy jobs fast to start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from moeforge.errors import BuildError
from moeforge.safetensors_io import ITEMSIZE, TORCH_NAME, OutTensor, TensorEntry, read_header, write_safetensors

GATES_SOURCE = "gates"


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _Headers:
    """Source file headers, read once per file per job."""

    def __init__(self, dirs: Mapping[str, Path]) -> None:
        self.dirs = dirs
        self._cache: dict[Path, tuple[int, dict[str, TensorEntry]]] = {}

    def path(self, source: str, file: str) -> Path:
        return self.dirs[source] / file

    def entry(self, path: Path, name: str) -> tuple[int, TensorEntry]:
        if path not in self._cache:
            self._cache[path] = read_header(path)
        start, entries = self._cache[path]
        if name not in entries:
            raise BuildError(f"tensor {name!r} is not in the file", str(path),
                             "the weights changed since validation; rerun from fetch_metadata")
        return start, entries[name]


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


def _out_tensor(row: Mapping[str, str], headers: _Headers) -> OutTensor:
    shape = _shape(row["shape"])
    nbytes = _numel(shape) * ITEMSIZE[row["dtype_out"]]
    path = headers.path(row["source"], row["source_file"])
    start, entry = headers.entry(path, row["source_name"])
    if entry.shape != shape or entry.dtype != row["dtype_in"]:
        raise BuildError(f"tensor {row['source_name']!r} is {entry.dtype}{list(entry.shape)}, the plan expects "
                         f"{row['dtype_in']}{list(shape)}", str(path),
                         "the weights changed since validation; rerun from fetch_metadata")
    if row["transform"] == "copy":
        return OutTensor(row["target_name"], row["dtype_out"], shape, nbytes, src_path=path,
                         src_offset=start + entry.begin)
    return OutTensor(row["target_name"], row["dtype_out"], shape, nbytes,
                     produce=_producer(path, row["source_name"], row["transform"], row["dtype_out"]))


def write_shard(rows: pd.DataFrame, weight_dirs: Mapping[str, Path], gates_path: Path | None, out: Path) -> int:
    """Write one shard file from its plan rows; returns the number of tensors written."""
    if rows.empty:
        raise BuildError("no plan rows for this shard", str(out), "rerun the validate step")
    dirs = dict(weight_dirs)
    if gates_path is not None:
        dirs[GATES_SOURCE] = gates_path.parent
    headers = _Headers(dirs)
    tensors = [_out_tensor(row, headers) for row in rows.to_dict("records")]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, tensors, {"format": "pt"})
    return len(tensors)


def weight_dirs_from(records: list[Path]) -> dict[str, Path]:
    """slug -> weights directory, from fetch_weights' weights.json files."""
    dirs = {}
    for path in records:
        record = json.loads(Path(path).read_text())
        dirs[record["slug"]] = Path(record["dir"])
    return dirs
