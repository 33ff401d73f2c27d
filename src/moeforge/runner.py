"""The bridge from a Snakemake ``script:`` to the library: logging and clean failures.

A user-caused problem (MoeforgeError) becomes one message on stderr and in the rule's log,
and a non-zero exit, instead of a traceback from library internals.
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from moeforge.errors import MoeforgeError

#: File-system conditions a user fixes outside moeforge: reported in one line, not a traceback.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free disk space (or point results/ at a larger disk) and rerun; finished outputs are kept",
    errno.EDQUOT: "free space within your quota and rerun; finished outputs are kept",
    errno.EROFS: "the file system is read-only: run from a writable working directory",
    errno.EACCES: "check the permissions of the working directory and of the Hugging Face cache",
}


def _setup_logging(log_paths: Any) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    for path in list(log_paths or [])[:1]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s moeforge: %(message)s", handlers=handlers,
                        force=True)


def run(smk: Any, step: Callable[[Any], Any]) -> None:
    """Run one workflow step; exit 1 with a single clear message on a user-facing error."""
    _setup_logging(getattr(smk, "log", None))
    log = logging.getLogger("moeforge")
    try:
        step(smk)
    except MoeforgeError as exc:
        log.error("%s", exc)
        sys.exit(1)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = exc.filename or next(iter(getattr(smk, "output", None) or []), "output")
        log.error("%s: %s -> %s", where, exc.strerror, _ENVIRONMENT_ERRNOS[exc.errno])
        sys.exit(1)
