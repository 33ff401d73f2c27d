"""sha256 of source files, trusted without a read while the file's stat tuple is unchanged (git's index rule).

A copy that keeps timestamps (``cp -p``, ``rsync -a``, an unpacked archive) or an edit with its mtime put
back leaves size and mtime as they were, but not what user space cannot set: the inode change time, and
for a replaced file the inode. So a cached sha256 is reused only while size, mtime_ns, ctime_ns, inode and
device all match what they were when the file was hashed; any change rehashes it. A file changed within
RACY_NS before it was hashed is not cached: a second change inside the same timestamp tick would leave
its stat tuple as it was (git's "racy clean" case), so such a file is hashed again next time.

The cache is one small JSON file per model under resources/. It is a cache, not a workflow output: several
jobs (and ``snakemake verify``) read and replace it, each write is atomic, and a lost or damaged cache
costs one more read of each file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from moeforge.errors import ModelError
from moeforge.io.files import sha256_file, write_json

#: The stat fields that decide "unchanged" (user space can set the times of access and modification only).
STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")
#: How recent a change makes a hash untrustworthy later: above any file system's timestamp granularity
#: (ext4 and xfs: a clock tick of a few ms; NFS servers and FAT: up to 2 s).
RACY_NS = 2_000_000_000


def stat_tuple(path: Path) -> list[int]:
    """What identifies a file's content without reading it (links followed, as a reader of the file sees it)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class HashCache:
    """One model's cached sha256 values, keyed by file name, each with the stat tuple it was taken at."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries = self._load()
        self._dirty = False

    def _load(self) -> dict[str, dict]:
        """The cache as written, or empty when it is absent or unreadable (it is only a cache)."""
        try:
            data = json.loads(self.path.read_text())
            entries = data["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def sha256(self, path: Path, name: str) -> str:
        """The file's sha256: the cached one while its stat tuple is unchanged, else read and hashed now.

        A file that changes while it is read is refused: its hash would describe neither version.
        """
        started = time.time_ns()
        before = stat_tuple(path)
        entry = self._entries.get(name)
        if isinstance(entry, dict) and entry.get("stat") == before and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = sha256_file(path)
        if stat_tuple(path) != before:
            raise ModelError(f"{path} changed while it was being hashed", str(path.parent),
                             "rerun once nothing writes to the model's files")
        _, mtime_ns, ctime_ns, _, _ = before
        if max(mtime_ns, ctime_ns) < started - RACY_NS:
            self._entries[name] = {"stat": before, "sha256": digest}
            self._dirty = True
        elif self._entries.pop(name, None) is not None:
            self._dirty = True
        return digest

    def keep_only(self, names: set[str]) -> None:
        """Forget files no longer in the model, so the cache does not grow with every replaced file name."""
        stale = set(self._entries) - names
        for name in stale:
            del self._entries[name]
        self._dirty |= bool(stale)

    def save(self) -> None:
        """Write the cache when anything was hashed or forgotten (atomically: a reader sees old or new)."""
        if self._dirty:
            write_json(self.path, {"stat_fields": list(STAT_FIELDS), "files": self._entries})
            self._dirty = False
