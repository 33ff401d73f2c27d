"""Names that become paths or Snakemake wildcards: merge names and the file names a lock records.

Each is checked as a whole string (a regex's ``$`` also matches before a final newline, so ``match``
alone lets ``"demo\\n"`` through), and a file name taken from a document someone hands over (a lock)
must stay inside the directory it is joined to: no absolute path, no ``..``, no control characters.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from moeforge.errors import MoeforgeError

#: Merge names become directories under results/ and Snakemake wildcard values.
MERGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MERGE_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
#: Snakemake refuses a wildcard value that ends in a part repeated 20 to 100 times, taking it for a
#: rule feeding itself (its PeriodicityDetector); such a merge name is refused here first, in moeforge's words.
PERIODIC_END = re.compile(r"(?P<part>.+?)(?P=part){19,99}$")
#: The directories under results/ that the workflow writes for itself (shards, gates and class checks by key,
#: search rankings, verify reports): a merge of one of these names would write its model among them (a search
#: named ``model`` would write its ranking into the published model of a merge named ``search``).
WORKFLOW_DIRS = frozenset({"class_checks", "gates", "search", "shards", "verify"})


def is_merge_name(name: object) -> bool:
    """Whether ``name`` is a whole merge name (no newline, no path, not . or ..)."""
    return isinstance(name, str) and MERGE_NAME.fullmatch(name) is not None and name not in (".", "..")


def check_merge_name(name: object, where: str, error: type[MoeforgeError]) -> None:
    """Refuse a merge name that is not one, that Snakemake cannot take as a wildcard, or whose ``results/<name>/``
    is a directory of the workflow's own (naming where it came from)."""
    check_wildcard_name(name, where, error)
    if name in WORKFLOW_DIRS:
        raise error(f"merge name {name!r} is taken: results/{name}/ holds the workflow's own files", where,
                    f"name the merge otherwise (not {', '.join(sorted(WORKFLOW_DIRS))})")


def check_wildcard_name(name: object, where: str, error: type[MoeforgeError]) -> None:
    """Refuse a name that is not a merge name or that Snakemake cannot take as a wildcard: a search's name, which
    starts its candidates' names and names its ranking's directory."""
    if not is_merge_name(name):
        raise error(f"merge name {name!r} is not allowed", where, f"use {MERGE_NAME_RULE}")
    assert isinstance(name, str)
    periodic = PERIODIC_END.search(name)
    if periodic:
        raise error(f"merge name {name!r} is not allowed: it ends in {periodic['part']!r} repeated "
                    f"{len(periodic[0]) // len(periodic['part'])} times, which Snakemake refuses in a wildcard",
                    where, "use a name that does not end in a part repeated 20 times or more")


def relative_file_problem(name: object) -> str | None:
    """Why ``name`` cannot be a file inside a model directory, or None when it can."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    if any(not c.isprintable() for c in name):
        return "holds control characters"
    if "\\" in name:
        return "holds a backslash"
    path = PurePosixPath(name)
    if path.is_absolute():
        return "is an absolute path"
    if any(part == ".." for part in path.parts):
        return "leaves the directory (..)"
    return None
