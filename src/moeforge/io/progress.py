"""How far a long job is: counts, time so far and an estimate of the time left, on the console and in its log.

Jobs run under moeforge's runner, whose logging reaches both; a line is written at most every
``EVERY`` seconds and once at the end, and a job that ends within ``EVERY`` seconds writes nothing
(a tiny model's passes stay quiet, a 7B-class layer stream reports as it goes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("moeforge.progress")
T = TypeVar("T")

#: Seconds between two progress lines of one job.
EVERY = 5.0
#: Bytes in a MiB, the unit progress lines count bytes in (and the workflow's memory requests are in).
MIB = 1 << 20
GIB = 1 << 30


class Progress:
    """``advance`` as work is done; it logs ``what: 3/16 layers (19%), 12 s so far, about 52 s left``."""

    def __init__(self, what: str, total: float, unit: str, every: float | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.every = EVERY if every is None else every
        self.done = 0.0
        self.start = self.last = time.monotonic()
        self.reported = False

    def advance(self, amount: float = 1) -> None:
        self.done += amount
        now = time.monotonic()
        finished = self.done >= self.total
        if (finished and (self.reported or now - self.start >= self.every)) or (
                not finished and now - self.last >= self.every):
            self.last, self.reported = now, True
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.start
        if self.done >= self.total:
            return f"{self.what}: {_count(self.total)} {self.unit} done in {elapsed:.0f} s"
        left = elapsed / self.done * (self.total - self.done) if self.done else None
        share = 100 * self.done / self.total if self.total else 100
        return (f"{self.what}: {_count(self.done)}/{_count(self.total)} {self.unit} ({share:.0f}%), {elapsed:.0f} s "
                f"so far" + (f", about {left:.0f} s left" if left is not None else ""))


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def tracked(items: Iterable[T], what: str, total: int, unit: str, enabled: bool = True) -> Iterator[T]:
    """``items``, with a Progress advanced after each one (when ``enabled``)."""
    progress = Progress(what, total, unit) if enabled else None
    for item in items:
        yield item
        if progress is not None:
            progress.advance()
