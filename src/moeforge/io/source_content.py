"""A local source model's content record: what the rules built from the model depend on, instead of mtimes.

Snakemake decides what to rerun from modification times, and a copy that keeps them (``cp -p``,
``rsync -a``, an unpacked archive) does not move them. So the rules below a local model read its
content record (``content.json``: each file's name, size and sha256), and the workflow brings that record
up to date each time it is read: files whose stat tuple changed are hashed again (moeforge.io.hashcache),
and the record is rewritten only when some file's bytes changed. A changed source then reruns everything
built from it; a byte-identical replacement (same bytes, new inode) reruns nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeforge.io.fetch import local_model_dir
from moeforge.io.files import write_json
from moeforge.io.hashcache import HashCache
from moeforge.io.refs import parse_ref


def content_of(directory: Path, cache: HashCache) -> list[dict[str, Any]]:
    """Name, size and sha256 of every file of a model directory (links followed), in name order."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    cache.keep_only({p.name for p in files})
    return [{"name": p.name, "size": p.stat().st_size, "sha256": cache.sha256(p, p.name)} for p in files]


def _record(raw: str, directory: Path, cache_path: Path) -> dict[str, Any]:
    cache = HashCache(cache_path)
    record = {"ref": raw, "files": content_of(directory, cache)}
    cache.save()
    return record


def write_source_content(raw: str, out: Path, cache_path: Path) -> dict[str, Any]:
    """The first content record of a local model (rule hash_source): every file hashed, through the cache."""
    record = _record(raw, local_model_dir(parse_ref(raw)), cache_path)
    write_json(out, record)
    return record


def refresh_source_content(raw: str, out: Path, cache_path: Path) -> list[str]:
    """Bring an existing content record up to date (at parse time); the names of the files whose bytes changed.

    Costs a stat call per file while nothing changed. The record is rewritten only when the content
    differs, so its mtime, which the rules below compare, moves only then. Nothing is done before the
    first record exists (rule hash_source writes it) or while the directory is gone (a finished build is
    not undone by a deleted source; ``snakemake verify`` reports it).
    """
    ref = parse_ref(raw)
    directory = Path(ref.path or "").expanduser()
    if ref.kind != "local" or not out.is_file() or not directory.is_dir():
        return []
    record = _record(raw, directory, cache_path)
    try:
        old = json.loads(out.read_text())
    except ValueError:
        old = {}
    if old == record:
        return []
    write_json(out, record)
    before = {f["name"]: f for f in old.get("files", [])} if isinstance(old, dict) else {}
    now = {f["name"]: f for f in record["files"]}
    return sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name))
