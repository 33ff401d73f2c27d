"""The shard writer's output path: bytes and hash across buffer boundaries and an odd-sized tail, on disk
and on tmpfs (where the page cache is the file itself, so the writeback advice does nothing)."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from moeforge.errors import ModelError
from moeforge.io.safetensors_file import OutTensor, write_safetensors
from moeforge.io.stream_write import BUFFER_BYTES, StreamWriter

TMPFS = Path("/dev/shm")


def _write_mixed(path: Path, source: Path) -> tuple[bytes, str, list[int]]:
    """Header-like bytes, a copy across two buffer boundaries, computed bytes, an odd-sized tail."""
    data = source.read_bytes()
    expected = b"head" * 3 + data[100:100 + 2 * BUFFER_BYTES + 5] + bytes(range(256)) * 4097 + data[7:19]
    digest, pieces = hashlib.sha256(), []
    writer = StreamWriter(path, digest.update)
    writer.write(b"head" * 3)
    with open(source, "rb") as src:
        writer.copy_from(src, 100, 2 * BUFFER_BYTES + 5, lambda piece: pieces.append(len(piece)), EOFError)
        writer.write(bytes(range(256)) * 4097)
        writer.copy_from(src, 7, 12, None, EOFError)
    writer.close()
    return expected, digest.hexdigest(), pieces


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(os.urandom(2 * BUFFER_BYTES + 4096))
    return path


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_bytes_and_hash_are_what_was_written(tmp_path, source, where):
    if where == "tmpfs" and not TMPFS.is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    out = (TMPFS if where == "tmpfs" else tmp_path) / f"out-{os.getpid()}.bin"
    try:
        expected, digest, pieces = _write_mixed(out, source)
        written = out.read_bytes()
    finally:
        out.unlink(missing_ok=True)
    assert written == expected and digest == hashlib.sha256(expected).hexdigest()
    assert sum(pieces) == 2 * BUFFER_BYTES + 5 and max(pieces) <= BUFFER_BYTES and len(pieces) == 3


def test_a_source_that_ends_early_is_one_model_error(tmp_path):
    source = tmp_path / "short.safetensors"
    source.write_bytes(bytes(100))
    tensors = [OutTensor("w", "BF16", (100,), 200, src_path=source, src_offset=0)]
    with pytest.raises(ModelError, match=r"unexpected end of file at offset 100, inside the bytes of tensor 'w'"):
        write_safetensors(tmp_path / "out.safetensors", tensors)
    assert not list(tmp_path.glob("*out.safetensors*"))


def test_a_failed_background_write_is_raised_in_the_job():
    """The disk refusing a write (here /dev/full: no space) surfaces as the OSError itself, not lost in a thread."""
    writer = StreamWriter("/dev/full")
    with pytest.raises(OSError) as failed:
        writer.write(bytes(3 * BUFFER_BYTES))
        writer.close()
    writer.abort()
    assert failed.value.errno == errno.ENOSPC
