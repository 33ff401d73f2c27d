"""Atomic file output, hashing, and reading the files users supply.

Every output is written under a temporary name in its final directory and renamed into place
when complete, so a crash never leaves a file (or a model directory) that looks finished.
A damaged input file (a recipe, a model's config.json) is one moeforge error naming the file and
the place in it, never a UnicodeDecodeError or JSONDecodeError traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from moeforge.errors import MoeforgeError
from moeforge.io.progress import MIB, Progress

_HASH_CHUNK = 16 << 20


def sha256_file(path: Path) -> str:
    """The file's sha256. The next chunk is read on a second thread while this one is hashed (both
    release the GIL): a file not in the page cache hashes in about the longer of reading and hashing
    it, not their sum. Hashing a model's weights (verify, reproduce, a local source's first use) takes
    minutes at 7B: a file that takes longer than a few seconds reports its progress."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh, ThreadPoolExecutor(max_workers=1) as reader:
        progress = Progress(f"sha256 of {path.name}", os.fstat(fh.fileno()).st_size / MIB, "MiB hashed")
        pending = reader.submit(fh.read, _HASH_CHUNK)
        while chunk := pending.result():
            pending = reader.submit(fh.read, _HASH_CHUNK)
            digest.update(chunk)
            progress.advance(len(chunk) / MIB)
    return digest.hexdigest()


def read_text(path: Path, owner: str, error: type[MoeforgeError], fix: str) -> str:
    """A user-supplied text file, decoded as UTF-8 whatever the locale (every format moeforge reads is UTF-8).

    Bytes that are not UTF-8 (a file saved as Latin-1) are one `error` naming the file, `owner`
    (whose file it is, e.g. ``model org/name``) and the first bad byte.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at position {exc.start}, line {line})",
                    _where(path, owner), fix) from None


def read_json(path: Path, owner: str, error: type[MoeforgeError], fix: str) -> Any:
    """A user-supplied JSON file; a truncated or hand-broken one is one `error` naming the file and the place."""
    text = read_text(path, owner, error, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}", _where(path, owner),
                    fix) from None


def _where(path: Path, owner: str) -> str:
    return f"{owner} ({path})" if owner else str(path)


def _tmp_name(path: Path) -> Path:
    """A temporary sibling; leftovers of killed writers of the same path are removed first."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced, made 0644 and renamed to `path`.

    Readers see the old file or the complete new one, never a partial one, and a writer killed
    midway leaves only a hidden temporary that the next writer of the same path removes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def dumps_json(data: Any) -> str:
    """The one JSON style of every moeforge output: stable and readable."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def json_sha256(value: Any) -> str:
    """sha256 of a JSON value with its keys sorted: the same value gives the same digest in any key order.
    What names a job's output after the settings it is computed from (gates, class checks)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_json(path: Path, data: Any) -> None:
    write_bytes(path, dumps_json(data).encode())


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` to ``dst`` (no bytes rewritten); copy only where a link is impossible (another
    file system). Returns whether it linked, so a caller can say that it copied."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        return False
    return True


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a directory under a temporary name; it appears at `path` only when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shown_path(path: Path | str) -> str:
    """How a report names a file or directory: never by an absolute path of the machine that wrote it.

    Inside the working directory, relative to it; in the Hugging Face cache, as ``org/name@commit/file``;
    a file shipped with moeforge, as ``moeforge/...``; anything else by its last two parts (``…/parent/name``).
    """
    path = Path(path).absolute()
    cwd = Path.cwd()
    if path.is_relative_to(cwd):
        return str(path.relative_to(cwd)) or "."
    parts = path.parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        repo = parts[i - 1]
        if repo.startswith(("models--", "datasets--")) and len(parts) > i + 1:
            repo_id = repo.split("--", 1)[1].replace("--", "/")
            return "/".join([f"{repo_id}@{parts[i + 1]}", *parts[i + 2:]])
    package = Path(__file__).resolve().parent.parent
    if path.is_relative_to(package):
        return str(Path("moeforge") / path.relative_to(package))
    return "…/" + "/".join(parts[-2:])
