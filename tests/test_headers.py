"""Safetensors headers are held to the safetensors library's own rules, before any weight is read.

A header says which bytes are which tensor; a wrong one does not crash, it yields a wrong model.
Each fault is made by rewriting the header of a real file written by ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moeforge.errors import ModelError
from moeforge.io.fetch import fetch_weights, locate_weights
from moeforge.io.inventory import write_inventory
from moeforge.io.safetensors_file import OutTensor, read_header, write_safetensors

Header = dict[str, dict]


def _save(path: Path) -> Path:
    """Two 16-byte F32 tensors: ``a`` at data bytes [0, 16), ``b`` at [16, 32)."""
    save_file({"a": torch.arange(4, dtype=torch.float32).reshape(2, 2), "b": torch.ones(4)}, str(path))
    header, _ = _split(path)
    assert [header["a"]["data_offsets"], header["b"]["data_offsets"]] == [[0, 16], [16, 32]]
    return path


def _split(path: Path) -> tuple[Header, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _rewrite(path: Path, header: Header, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _overlap(h: Header, d: bytes) -> tuple[Header, bytes]:
    h["b"]["data_offsets"] = [8, 24]
    return h, d


def _size(h: Header, d: bytes) -> tuple[Header, bytes]:
    h["b"]["shape"] = [5]
    return h, d


def _hole(h: Header, d: bytes) -> tuple[Header, bytes]:
    h["b"]["data_offsets"] = [20, 36]
    return h, d[:16] + bytes(4) + d[16:]


def _not_from_zero(h: Header, d: bytes) -> tuple[Header, bytes]:
    h["a"]["data_offsets"], h["b"]["data_offsets"] = [4, 20], [20, 36]
    return h, bytes(4) + d


def _trailing(h: Header, d: bytes) -> tuple[Header, bytes]:
    return h, d + bytes(8)


def _truncated(h: Header, d: bytes) -> tuple[Header, bytes]:
    return h, d[:-4]


def _unknown_dtype(h: Header, d: bytes) -> tuple[Header, bytes]:
    h["a"]["dtype"] = "F12"
    return h, d


def _negative_shape(h: Header, d: bytes) -> tuple[Header, bytes]:
    h["a"]["shape"] = [-2, -2]  # (-2) * (-2) * 4 bytes: the size alone would pass
    return h, d


def _float_shape(h: Header, d: bytes) -> tuple[Header, bytes]:
    h["a"]["shape"] = [2.0, 2]  # 2.0 * 2 * 4 == 16 in Python: the size alone would pass
    return h, d


Fault = Callable[[Header, bytes], tuple[Header, bytes]]
FAULTS: dict[str, tuple[Fault, list[str], str]] = {
    "overlap": (_overlap, ["a", "b"], r"overlap"),
    "size": (_size, ["b"], r"\(16 bytes\), but shape \[5\] of F32 takes 20 bytes"),
    "hole": (_hole, ["a", "b"], r"bytes \[16, 20\) between tensors 'a' and 'b' belong to no tensor"),
    "not_from_zero": (_not_from_zero, ["a"], r"does not start with a tensor: bytes \[0, 4\)"),
    "trailing": (_trailing, ["b"], r"8 bytes after the last tensor 'b' belong to no tensor"),
    "truncated": (_truncated, ["b"], r"truncated"),
    "unknown_dtype": (_unknown_dtype, ["a"], r"unknown or unsupported dtype 'F12'"),
    "negative_shape": (_negative_shape, ["a"], r"must be non-negative integers"),
    "float_shape": (_float_shape, ["a"], r"must be non-negative integers"),
}


@pytest.fixture(params=sorted(FAULTS))
def faulty(request, tmp_path) -> tuple[Path, list[str], str]:
    """A file with one header fault, the tensors the message must name, and the message's pattern."""
    fault, names, pattern = FAULTS[request.param]
    path = _save(tmp_path / "model.safetensors")
    _rewrite(path, *fault(*_split(path)))
    return path, names, pattern


def test_each_fault_is_refused_by_name(faulty):
    path, names, pattern = faulty
    with pytest.raises(ModelError) as caught:
        read_header(path)
    message = str(caught.value)
    assert re.search(pattern, message), message
    assert str(path) in message
    assert all(f"'{name}'" in message for name in names), message
    assert "->" in message  # says what to do


def test_the_safetensors_library_refuses_them_too(faulty):
    path, _, _ = faulty
    with pytest.raises(SafetensorError):
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()


def test_untouched_file_passes_and_agrees_with_the_library(tmp_path):
    path = _save(tmp_path / "model.safetensors")
    start, entries = read_header(path)
    raw = path.read_bytes()
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(entries)
        for name in handle.keys():
            assert list(handle.get_slice(name).get_shape()) == list(entries[name].shape)
    for name, tensor in load_file(str(path)).items():
        entry = entries[name]
        assert raw[start + entry.begin:start + entry.end] == tensor.numpy().tobytes()


def test_files_moeforge_writes_pass(tmp_path):
    """The writer pads its header and orders tensors by item size; both readers accept the result."""
    path = tmp_path / "out.safetensors"
    tensors = [OutTensor("h", "F16", (3,), 6, produce=lambda: bytes(6)),
               OutTensor("f", "F32", (2, 1), 8, produce=lambda: bytes(8)),
               OutTensor("s", "F32", (), 4, produce=lambda: bytes(4))]
    write_safetensors(path, tensors)
    assert sorted(read_header(path)[1]) == ["f", "h", "s"]
    assert sorted(load_file(str(path))) == ["f", "h", "s"]


def test_header_length_past_end_of_file_is_refused(tmp_path):
    path = _save(tmp_path / "model.safetensors")
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    with pytest.raises(ModelError, match="runs past the end of the file"):
        read_header(path)


def _hub_headers(path: Path) -> dict[str, Header]:
    """Headers as fetch._hub_metadata builds them from huggingface_hub's get_safetensors_metadata."""
    header, _ = _split(path)
    header.pop("__metadata__", None)
    return {"model.safetensors": header}


def test_hub_headers_are_checked_without_the_file(tmp_path):
    """Hub headers arrive by range request: every check that needs no file size applies."""
    headers = _hub_headers(_save(tmp_path / "model.safetensors"))
    write_inventory({"ref": "acme/m"}, headers, tmp_path / "ok.tsv")
    headers["model.safetensors"]["b"]["data_offsets"] = [8, 24]
    with pytest.raises(ModelError, match=r"acme/m: model.safetensors: tensors 'a' \[0, 16\] and 'b'"):
        write_inventory({"ref": "acme/m"}, headers, tmp_path / "bad.tsv")
    assert not (tmp_path / "bad.tsv").exists()


def test_downloaded_weights_are_checked_against_their_size(tmp_path):
    """fetch_weights rereads each header with the file's size: the end-of-buffer check Hub headers lacked."""
    model = tmp_path / "m"
    model.mkdir()
    path = _save(model / "model.safetensors")
    source = tmp_path / "source.json"
    source.write_text(json.dumps({"ref": str(model), "kind": "local", "repo_id": None, "resolved_revision": None,
                                  "local_path": str(model), "slug": "m", "files": [],
                                  "weight_files": ["model.safetensors"]}))
    cache = tmp_path / "sha256-cache.json"
    locate_weights(source, tmp_path / "weights.json", cache)
    fetch_weights(tmp_path / "weights.json", tmp_path / "fetched.json", cache)
    _rewrite(path, *_trailing(*_split(path)))
    locate_weights(source, tmp_path / "weights.json", cache)
    with pytest.raises(ModelError, match="8 bytes after the last tensor 'b'"):
        fetch_weights(tmp_path / "weights.json", tmp_path / "fetched2.json", cache)
    assert not (tmp_path / "fetched2.json").exists()


def _sharded(directory: Path) -> Path:
    """Shard 1 of 2 on disk (``a``, ``b``); the index also puts ``c`` in shard 2, which is absent."""
    directory.mkdir()
    _save(directory / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                  "c": "model-00002-of-00002.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_index_naming_a_missing_shard_warns(tmp_path, caplog):
    from moeforge.runtime.layerwise import CheckpointTensors

    with caplog.at_level(logging.WARNING, logger="moeforge"):
        store = CheckpointTensors(_sharded(tmp_path / "m"))
    assert "model-00002-of-00002.safetensors" in caplog.text
    assert "model-00001-of-00002.safetensors" not in caplog.text
    assert torch.equal(store.read(["a"])["a"], torch.arange(4, dtype=torch.float32).reshape(2, 2))


def test_tensor_in_a_missing_shard_stays_an_error(tmp_path):
    from moeforge.runtime.layerwise import CheckpointTensors

    store = CheckpointTensors(_sharded(tmp_path / "m"))
    with pytest.raises(ModelError, match="tensor c is in model-00002-of-00002.safetensors"):
        store.read(["a", "c"])


def test_complete_index_does_not_warn(tmp_path, caplog):
    from moeforge.runtime.layerwise import CheckpointTensors

    model = _sharded(tmp_path / "m")
    save_file({"c": torch.zeros(1)}, str(model / "model-00002-of-00002.safetensors"))
    with caplog.at_level(logging.WARNING, logger="moeforge"):
        CheckpointTensors(model)
    assert "shard" not in caplog.text
