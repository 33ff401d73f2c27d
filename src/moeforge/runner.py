"""The bridge from a Snakemake ``script:`` to the library: logging and clean failures.

A user-caused problem (MoeforgeError) becomes one message on stderr and in the rule's log,
and a non-zero exit, instead of a traceback from library internals.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

from moeforge.errors import MoeforgeError


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
    try:
        step(smk)
    except MoeforgeError as exc:
        logging.getLogger("moeforge").error("%s", exc)
        sys.exit(1)
