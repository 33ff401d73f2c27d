"""Finding and reading a moeforge.lock.json that a build wrote, possibly on another machine, long ago.

A ``lock:`` merge names a lock file, a model directory holding one, or a Hub repo (``org/name``,
``org/name@revision``) holding one. A lock someone hands over is input like a recipe: every way it
can be unusable (not found, not JSON, written by a newer moeforge, fields missing) is one message
naming the file, never a KeyError in a later job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeforge.errors import FetchError, MoeforgeError, RecipeError
from moeforge.io.fetch import hub_errors
from moeforge.io.files import read_json
from moeforge.io.hashcache import stat_tuple
from moeforge.io.names import MERGE_NAME_RULE, is_merge_name, relative_file_problem
from moeforge.io.refs import parse_ref
from moeforge.io.schema import package_schema, schema_errors

LOCK_NAME = "moeforge.lock.json"
#: The lock format this code writes and reads; a greater number comes from a newer moeforge.
LOCK_VERSION = 1
_FIX = "give the moeforge.lock.json a moeforge build wrote, unedited (or a model directory or Hub repo holding one)"


@dataclass(frozen=True)
class LockRef:
    """Where a lock came from: its file on this machine, and the published model beside it, if any."""

    raw: str
    path: Path
    model_dir: Path | None = None
    repo_id: str | None = None
    revision: str | None = None  # the commit the lock was read at (Hub)

    @property
    def has_model(self) -> bool:
        """Whether the recorded model's files can be had (a model directory or a Hub repo, not a bare lock)."""
        return self.model_dir is not None or self.repo_id is not None

    def local_files(self) -> list[str]:
        """The lock and the published model's files on this machine: what a comparison with them reads (a Hub
        model's files are fetched by that job; a commit's files do not change)."""
        if self.model_dir is None:
            return [str(self.path)]
        return sorted(str(p) for p in self.model_dir.iterdir() if p.is_file())

    def model_file(self, name: str) -> Path | None:
        """A file of the published model on this machine (a Hub file is downloaded into the cache); None if absent."""
        if self.model_dir is not None:
            path = self.model_dir / name
            return path if path.is_file() else None
        if self.repo_id is None:
            return None
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return _hub_file(self.repo_id, name, self.revision, self.raw)
        except EntryNotFoundError:
            return None


def _hub_file(repo_id: str, name: str, revision: str | None, raw: str) -> Path:
    """One file of a Hub repo, from the cache when it is there (offline too); raises EntryNotFoundError if the
    repo has no such file."""
    from huggingface_hub import hf_hub_download

    with hub_errors(raw, subject=name, not_local=", and there is no local file or directory of that name"):
        return Path(hf_hub_download(repo_id, name, revision=revision))


def resolve_lock_ref(raw: str) -> LockRef:
    """A lock file, a directory holding one, or a Hub repo holding one (its lock is downloaded, or read from
    the cache offline)."""
    path = Path(raw).expanduser()
    if path.is_file():
        return LockRef(raw, path)
    if path.is_dir():
        if not (path / LOCK_NAME).is_file():
            raise FetchError(f"the directory holds no {LOCK_NAME}", raw,
                             "give a model directory a moeforge build wrote, or the lock file itself")
        return LockRef(raw, path / LOCK_NAME, model_dir=path)
    ref = parse_ref(raw)
    if ref.kind != "hub":
        raise FetchError("no such lock file or model directory", str(path.absolute()),
                         "check the `lock:` path (relative paths are relative to the working directory)")
    from huggingface_hub.errors import EntryNotFoundError

    try:
        lock = _hub_file(ref.repo_id or "", LOCK_NAME, ref.revision, raw)
    except EntryNotFoundError:
        raise FetchError(f"the Hub repository holds no {LOCK_NAME}", raw,
                         "only merges built by moeforge can be rebuilt from their lock; build this one from its "
                         "recipe instead") from None
    # The cache keeps each file under snapshots/<commit>/: the commit this lock was read at.
    return LockRef(raw, lock, repo_id=ref.repo_id, revision=lock.parent.name)


def read_lock(path: Path) -> dict[str, Any]:
    """A lock file, checked: JSON, a version this code reads, every field moeforge relies on."""
    data = read_json(path, "", RecipeError, _FIX)
    if not isinstance(data, dict):
        raise RecipeError("not a moeforge lock: a JSON object is expected", str(path), _FIX)
    version = data.get("moeforge_lock_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > LOCK_VERSION:
        raise RecipeError(f"written by a newer moeforge (moeforge_lock_version {version}; this moeforge reads "
                          f"version {LOCK_VERSION})", str(path), "upgrade moeforge and rerun")
    schema = package_schema("lock")
    missing = [key for key in schema["required"] if key not in data]
    if missing:
        raise RecipeError(f"not a complete moeforge lock: missing {', '.join(missing)}", str(path), _FIX)
    problems = schema_errors(data, schema)
    if problems:
        raise RecipeError(f"not a complete moeforge lock: {'; '.join(problems)}", str(path), _FIX)
    malformed = _name_problems(data)
    if malformed:
        raise RecipeError(f"a malformed lock: {'; '.join(malformed)}", str(path), _FIX)
    return data


def _name_problems(lock: dict[str, Any]) -> list[str]:
    """The lock's names that would become paths and cannot: its merge name, and each file name, which is
    joined to a source or model directory (an absolute or ``..`` name would hash a file outside it)."""
    problems = [] if is_merge_name(lock["merge"]) else [f"merge {lock['merge']!r} is not a merge name "
                                                          f"({MERGE_NAME_RULE})"]
    named = [(f"sources.{slug}.files", record["name"]) for slug, source in lock["sources"].items()
             for record in source["files"]]
    named += [("files", name) for name in lock["files"]]
    for where, name in named:
        why = relative_file_problem(name)
        if why:
            problems.append(f"{where}: file name {name!r} {why}")
    return problems


def load_lock(raw: str) -> tuple[LockRef, dict[str, Any]]:
    """Resolve a ``lock:`` reference and read the lock it names."""
    ref = resolve_lock_ref(raw)
    return ref, read_lock(ref.path)


def source_file(source: dict[str, Any], name: str, model_root: Path) -> Path | None:
    """A source file a lock names, where it is on this machine: the local directory (or moeforge's converted
    copy of a .bin model under ``model_root``), the Hugging Face cache at the recorded commit; None when absent."""
    if source["kind"] == "local":
        directory = Path(source["ref"]).expanduser()
        candidates = [directory / name, model_root / "meta" / "weights" / name] if directory.is_dir() else []
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(parse_ref(source["ref"]).repo_id, name, revision=source["resolved_revision"])
        candidates = [Path(cached)] if isinstance(cached, str) else []
    return next((path for path in candidates if path.is_file()), None)


def sources_state(model_dir: Path, models_root: Path) -> str:
    """A fingerprint of the source files a model's lock names, from their stat tuples alone (no read).

    ``snakemake verify`` takes it as a parameter of each model's check, so the check runs again when a source
    was replaced or edited, even by a copy that kept its timestamps (the inode change time moves), and not
    otherwise. A lock that cannot be read gives a fingerprint of its own: the check then says why.
    """
    try:
        lock = read_lock(model_dir / LOCK_NAME)
    except MoeforgeError:
        return "unreadable lock"
    state = []
    for slug, source in sorted(lock["sources"].items()):
        for entry in source["files"]:
            path = source_file(source, entry["name"], models_root / slug)
            state.append([slug, entry["name"], stat_tuple(path) if path is not None else None])
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()
