"""Source files are known unchanged only by what user space cannot forge; a changed source is named.

The stat cache (moeforge.io.hashcache), the local content record the workflow keeps current at parse
time (moeforge.io.source_content), and verify's rehash of the sources a lock names. The workflow runs
that build on them are in test_workflow.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from hfcache import populate
from moeforge.check.verify import check_sources
from moeforge.errors import BuildError
from moeforge.io.hashcache import HashCache, stat_tuple
from moeforge.io.source_content import refresh_source_content, write_source_content


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seed(cache: Path, path: Path, digest: str) -> None:
    """A cache entry as an earlier run left it: the file's stat tuple now, and `digest`."""
    cache.write_text(json.dumps({"files": {path.name: {"stat": stat_tuple(path), "sha256": digest}}}))


def replace_keeping_times(path: Path, data: bytes) -> None:
    """What cp -p, rsync -a or unpacking an archive does: new bytes (a new inode), the old mtime."""
    st = path.stat()
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_an_unchanged_stat_tuple_is_trusted_and_any_change_rehashes(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abcd")
    seed(tmp_path / "cache.json", path, "f" * 64)
    assert HashCache(tmp_path / "cache.json").sha256(path, path.name) == "f" * 64  # no read: the entry is reused
    path.chmod(0o600)  # the inode change time moves, nothing else
    assert HashCache(tmp_path / "cache.json").sha256(path, path.name) == sha(b"abcd")


def test_a_copy_that_keeps_size_and_mtime_is_hashed_again(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abcd")
    seed(tmp_path / "cache.json", path, sha(b"abcd"))
    replace_keeping_times(path, b"abce")
    assert HashCache(tmp_path / "cache.json").sha256(path, path.name) == sha(b"abce")


def test_a_file_changed_just_before_it_was_hashed_is_not_trusted_later(tmp_path):
    """An edit in place with its mtime put back, inside the same timestamp tick as the hash, changes no stat
    field: a hash of a file that recent is therefore not cached."""
    path = tmp_path / "w.bin"
    path.write_bytes(b"abcd")
    cache = HashCache(tmp_path / "cache.json")
    assert cache.sha256(path, path.name) == sha(b"abcd")
    cache.save()
    assert not (tmp_path / "cache.json").exists()
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.write(b"x")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert HashCache(tmp_path / "cache.json").sha256(path, path.name) == sha(b"xbcd")


@pytest.fixture
def local_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights!")
    return model


def test_the_content_record_changes_with_the_bytes_only(local_model, tmp_path):
    record, cache = tmp_path / "content.json", tmp_path / "cache.json"
    assert refresh_source_content(str(local_model), record, cache) == []  # before rule hash_source wrote it
    assert not record.exists()
    written = write_source_content(str(local_model), record, cache)
    assert written["files"] == [{"name": "config.json", "size": 2, "sha256": sha(b"{}")},
                                {"name": "model.safetensors", "size": 8, "sha256": sha(b"weights!")}]
    first = (record.read_bytes(), record.stat().st_mtime_ns)
    weights = local_model / "model.safetensors"
    replace_keeping_times(weights, b"weights!")  # byte-identical: a new inode, the same content
    assert refresh_source_content(str(local_model), record, cache) == []
    assert (record.read_bytes(), record.stat().st_mtime_ns) == first
    replace_keeping_times(weights, b"weights?")
    assert refresh_source_content(str(local_model), record, cache) == ["model.safetensors"]
    assert json.loads(record.read_text())["files"][1]["sha256"] == sha(b"weights?")
    weights.unlink()
    assert refresh_source_content(str(local_model), record, cache) == ["model.safetensors"]


def test_a_deleted_source_leaves_its_record_alone(local_model, tmp_path):
    record, cache = tmp_path / "content.json", tmp_path / "cache.json"
    write_source_content(str(local_model), record, cache)
    before = record.read_bytes()
    for path in local_model.iterdir():
        path.unlink()
    local_model.rmdir()
    assert refresh_source_content(str(local_model), record, cache) == []
    assert record.read_bytes() == before


def _lock(sources: dict) -> dict:
    return {"merge": "m", "sources": sources}


def test_verify_names_a_changed_local_source(local_model, tmp_path):
    source = {"ref": str(local_model), "kind": "local", "resolved_revision": None, "roles": ["base"],
              "files": [{"name": "model.safetensors", "size": 8, "sha256": sha(b"weights!")}]}
    lock = _lock({"local--model": source, "local--gone": {**source, "ref": str(tmp_path / "gone")}})
    assert check_sources(lock, tmp_path / "models") == {"source_files_verified": 1, "source_files_not_here": 1}
    replace_keeping_times(local_model / "model.safetensors", b"weights?")
    with pytest.raises(BuildError, match=rf"1 source file\(s\) changed since the build: "
                                         rf"{local_model}/model.safetensors: sha256 differs from the lock"):
        check_sources(lock, tmp_path / "models")
    (local_model / "model.safetensors").unlink()
    with pytest.raises(BuildError, match=rf"{local_model}/model.safetensors: missing"):
        check_sources(lock, tmp_path / "models")


def test_verify_rehashes_a_hub_source_in_the_cache(local_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "5" * 40
    snapshot = populate(tmp_path / "hub", "acme/m", local_model, commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = {"ref": "acme/m", "kind": "hub", "resolved_revision": commit, "roles": ["base"],
              "files": [{"name": "model.safetensors", "size": 8, "sha256": sha(b"weights!")}]}
    assert check_sources(_lock({"hub--acme--m": source}), tmp_path / "models")["source_files_verified"] == 1
    (snapshot / "model.safetensors").resolve().write_bytes(b"damaged!")  # the blob behind the snapshot link
    with pytest.raises(BuildError, match=rf"{snapshot}/model.safetensors: sha256 differs from the lock"):
        check_sources(_lock({"hub--acme--m": source}), tmp_path / "models")
    absent = {**source, "resolved_revision": "6" * 40}
    assert check_sources(_lock({"hub--acme--m": absent}), tmp_path / "models")["source_files_not_here"] == 1
