"""A merge given as ``lock: REF``: the recorded recipe, built again from the recorded inputs.

The recorded recipe is used as it is, written out as the merge's recipe file so that validation
and every later stage run unchanged. Only its Hub references change: each is pinned to the commit
the build resolved (``org/name`` -> ``org/name@<commit>``), because a branch has moved on since.
Local sources cannot be pinned, so they are checked instead: each recorded weight file must be
there with its recorded size (when the workflow is parsed, cheap) and sha256 (in a job before
validation), or the rebuild would quietly be another merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from moeforge.errors import FetchError, ModelError
from moeforge.io.files import sha256_file, write_json, write_text
from moeforge.io.lockfile import LockRef, load_lock, read_lock
from moeforge.io.refs import parse_ref
from moeforge.plan.recipe import Recipe, parse_recipe, without_nulls

#: What each kind of recorded local file is called, and what to do when it differs from the lock.
_CHANGED = {
    "source": ("local source file(s)", "restore the source model the merge was built from (the lock records each "
               "weight file's size and sha256), or build a new merge from a recipe instead of the lock"),
    "text": ("train text(s)", "restore the training texts the merge was built from (the lock records each text's "
             "path, size and sha256), or build a new merge from a recipe instead of the lock"),
}


@dataclass(frozen=True)
class LockMerge:
    """A ``lock:`` merge as the workflow needs it when parsed: where the lock is, and its recipe, pinned."""

    ref: LockRef
    lock: dict[str, Any]
    recipe: Recipe

    @property
    def name(self) -> str:
        """The recorded merge's name: the rebuild's plan, card and lock carry it, so they can match the original."""
        return self.lock["merge"]

    def local_files(self) -> list[str]:
        """The recorded local weight files: inputs of the check, so an edit in place reruns it."""
        return [str(path) for _, _, path, _ in _local_files(self.lock)]


def pins(lock: Mapping[str, Any]) -> dict[str, str]:
    """Each Hub reference of the recorded recipe -> the same repo at the commit the build resolved."""
    out = {}
    for source in lock["sources"].values():
        if source["kind"] == "hub":
            out[source["ref"]] = f"{parse_ref(source['ref']).repo_id}@{source['resolved_revision']}"
    return out


def pinned_recipe(lock: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded recipe as a recipe document: Hub sources pinned, unset (null) keys left out as a recipe does."""
    pinned = pins(lock)

    recipe = without_nulls(lock["recipe"])
    recipe["base_model"] = pinned.get(recipe["base_model"], recipe["base_model"])
    for key in ("experts", "shared_experts"):
        for item in recipe.get(key, []):
            item["source_model"] = pinned.get(item["source_model"], item["source_model"])
    return recipe


def _local_files(lock: Mapping[str, Any]) -> Iterator[tuple[str, str, Path, Mapping[str, Any]]]:
    """(kind, reference, path on this machine, recorded file) for every weight file of every local source
    (kind ``source``), and every router training text (kind ``text``: it trains the routers as much as the
    weights make the experts)."""
    for source in lock["sources"].values():
        if source["kind"] == "local":
            for record in source["files"]:
                yield "source", source["ref"], Path(source["ref"]).expanduser() / record["name"], record
    for record in lock.get("train_texts", []):
        yield "text", f"{record['expert']}'s train_texts", Path(record["path"]).expanduser(), record


def _refuse_changes(problems: list[tuple[str, str]], where: str) -> None:
    """One message for every recorded file that differs, named by its kind (a weight file or a training text)."""
    if not problems:
        return
    kinds = list(dict.fromkeys(kind for kind, _ in problems))
    raise ModelError(f"{' and '.join(_CHANGED[k][0] for k in kinds)} differ from the lock: "
                     f"{'; '.join(problem for _, problem in problems)}", where,
                     "; ".join(_CHANGED[k][1] for k in kinds))


def check_local_sizes(lock: Mapping[str, Any], where: str) -> None:
    """Every recorded local weight file and training text is there with its recorded size (no file is read)."""
    problems = []
    for kind, ref, path, record in _local_files(lock):
        if kind == "source" and not path.parent.is_dir():
            raise FetchError(f"the local source directory {ref} recorded in the lock does not exist", where,
                             "put the source model where the lock says (relative paths are relative to the working "
                             "directory), or rebuild in the directory the merge was built in")
        if not path.is_file():
            problems.append((kind, f"{path}: missing"))
        elif path.stat().st_size != record["size"]:
            problems.append((kind, f"{path}: {path.stat().st_size} bytes, the lock records {record['size']}"))
    _refuse_changes(problems, where)


def check_local_hashes(lock: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """Every recorded local weight file and training text has its recorded sha256; returns what was checked."""
    check_local_sizes(lock, where)
    checked, problems = [], []
    for kind, ref, path, record in _local_files(lock):
        digest = sha256_file(path)
        checked.append({"ref": ref, "file": str(path), "sha256": digest})
        if digest != record["sha256"]:
            problems.append((kind, f"{path}: sha256 {digest}, the lock records {record['sha256']}"))
    _refuse_changes(problems, where)
    return checked


def merge_from_lock(raw: str) -> LockMerge:
    """Parse time: find and read the lock, pin its recipe and validate it, check local sources' sizes."""
    ref, lock = load_lock(raw)
    recipe = parse_recipe(pinned_recipe(lock), f"{ref.path}: recipe")
    check_local_sizes(lock, str(ref.path))
    return LockMerge(ref, lock, recipe)


def write_lock_recipe(lock_path: Path, recipe_out: Path, record_out: Path) -> dict[str, Any]:
    """The job before validation: local sources checked byte for byte, then the pinned recipe written out."""
    lock = read_lock(lock_path)
    checked = check_local_hashes(lock, str(lock_path))
    record = {"lock": str(lock_path), "merge": lock["merge"], "pinned": pins(lock), "local_files_checked": checked}
    write_text(recipe_out, yaml.safe_dump(pinned_recipe(lock), sort_keys=False, allow_unicode=True))
    write_json(record_out, record)
    return record
