"""Run a command under a memory limit that the kernel enforces: a memory cgroup made for it.

This is how to show that a build fits a smaller machine than the one at hand ("a 48 GB merge
checked on a 32 GB workstation") without trusting any process's own accounting: past the limit
the kernel's out-of-memory killer stops the largest process, exactly as on that machine, under
SLURM or in a container. Page cache counts against the limit but is reclaimed first.

cgroup v1 (``/sys/fs/cgroup/memory``, ``memory.limit_in_bytes``) and v2 (``memory.max`` in the
unified hierarchy, with the memory controller enabled for children of the root) are both
supported. Making a cgroup needs root (or a delegated subtree). The group is removed afterwards.

    python -m moeforge.runtime.memory_cap 3G -- snakemake --cores 2 --resources mem_mb=3000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moeforge.runtime.memory_budget import oom_kill_count

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class CapResult:
    """How a capped command ended and what the kernel recorded about its memory."""

    returncode: int
    limit_bytes: int
    peak_bytes: int | None
    oom_kills: int
    wall_s: float

    @property
    def killed_for_memory(self) -> bool:
        return self.oom_kills > 0


class MemoryCgroup:
    """One fresh memory cgroup with a limit; processes put in it (and their children) obey it."""

    def __init__(self, name: str, limit_bytes: int, root: Path = CGROUP_ROOT) -> None:
        self.limit_bytes = limit_bytes
        if (root / "memory").is_dir() and (root / "memory" / "memory.limit_in_bytes").exists():
            self.version, self.path = 1, root / "memory" / name
        elif (root / "cgroup.controllers").exists():
            self.version, self.path = 2, root / name
            _enable_v2_memory(root)
        else:
            raise OSError(f"no memory cgroup hierarchy under {root}")
        self.path.mkdir()
        limit_file = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        (self.path / limit_file).write_text(str(limit_bytes))
        if self.version == 2:
            (self.path / "memory.swap.max").write_text("0")  # the cap is memory, not memory plus swap

    def add(self, pid: int) -> None:
        """Move ``pid`` into the group; children it starts afterwards are in it too."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def peak(self) -> int | None:
        """The group's high-water mark in bytes (v2 ``memory.peak`` needs Linux 5.19)."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """Processes the out-of-memory killer stopped in this group."""
        return oom_kill_count(self.path, self.version)

    def remove(self) -> None:
        """Remove the group once its processes have exited (the kernel refuses while any remain)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        self.path.rmdir()


def _enable_v2_memory(root: Path) -> None:
    """v2: children of ``root`` get a memory controller only when the root's subtree_control says so."""
    control = root / "cgroup.subtree_control"
    if "memory" not in control.read_text().split():
        control.write_text("+memory")


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int, root: Path = CGROUP_ROOT) -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup for the duration of the block, removed afterwards."""
    group = MemoryCgroup(f"moeforge-cap-{os.getpid()}-{time.monotonic_ns()}", limit_bytes, root)
    try:
        yield group
    finally:
        group.remove()


def run_capped(command: Sequence[str], limit_bytes: int, **popen: object) -> CapResult:
    """Run ``command`` (and everything it starts) under ``limit_bytes`` of memory; wait for it."""
    with memory_cgroup(limit_bytes) as group:
        start = time.perf_counter()
        # The child joins the group before it execs, so not one page of it runs uncapped.
        process = subprocess.Popen(list(command), preexec_fn=lambda: group.add(os.getpid()), **popen)
        returncode = process.wait()
        wall = time.perf_counter() - start
        return CapResult(returncode, limit_bytes, group.peak(), group.oom_kills(), wall)


def parse_size(text: str) -> int:
    """``3G``, ``512M``, ``1048576``: bytes (binary units)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1] if text and text[-1] in _UNITS else ""
    number = text[: len(text) - len(unit)]
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 3G, 512M)") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moeforge.runtime.memory_cap", description=__doc__.splitlines()[0])
    parser.add_argument("limit", type=parse_size, help="memory limit, e.g. 3G")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    result = run_capped(command, args.limit)
    peak = "unknown" if result.peak_bytes is None else f"{result.peak_bytes / (1 << 30):.2f} GiB"
    print(f"memory_cap: exit {result.returncode}, peak {peak} of {args.limit / (1 << 30):.2f} GiB, "
          f"{result.oom_kills} out-of-memory kill(s), {result.wall_s:.1f} s", file=sys.stderr)
    return result.returncode if result.returncode >= 0 else 128 - result.returncode


if __name__ == "__main__":
    sys.exit(main())
