"""Publishing: the staging model that passed its smoke test, put where a finished model stands.

Only a checked model ever stands at ``results/<merge>/model/``: assembly writes the staging model, the
smoke test reads it there, and this step alone publishes it, as a new directory of hard links (no byte
rewritten; a copy only where a link is impossible) renamed into place whole. A model that failed its
checks stays in staging for inspection and is never published.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from moeforge.io.files import atomic_dir, link_or_copy
from moeforge.io.lockfile import LOCK_NAME

_log = logging.getLogger("moeforge.publish")


def publish(staging: Path, out_dir: Path) -> list[str]:
    """Publish the files the staging model's lock lists, and the lock, as ``out_dir``; returns the names of
    the files copied instead of linked (none on one file system).

    The lock is copied, not linked: it is the publish step's own output, whose modification time must be
    the publish's (a link would share, and Snakemake's touch would change, the staging lock's, which the
    smoke test's report must stay newer than). Published files are read-only.
    """
    files = json.loads((staging / LOCK_NAME).read_text(encoding="utf-8"))["files"]
    with atomic_dir(out_dir) as tmp:
        copied = [name for name in files if not link_or_copy(staging / name, tmp / name)]
        shutil.copyfile(staging / LOCK_NAME, tmp / LOCK_NAME)
        for name in [*copied, LOCK_NAME]:
            (tmp / name).chmod(0o444)
    if copied:
        _log.warning("%d of %d file(s) copied into %s, not hard-linked (%s is on another file system?): %s",
                     len(copied), len(files), out_dir, staging, ", ".join(copied))
    _log.info("published %s as %s: %d file(s) hard-linked, %d copied, and the lock", staging, out_dir,
              len(files) - len(copied), len(copied))
    return copied
