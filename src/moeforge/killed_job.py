"""Say in the rule's log why a job died when it could not say so itself.

A job that the kernel's out-of-memory killer stops (a cgroup limit set by SLURM, a container or
a workstation's cgroup) gets SIGKILL: no exception, no ``finally``, no message. Snakemake then
shows a bare non-zero exit and a log that ends mid-step. So each job starts a tiny watcher
process (no torch, no transformers: a few MB) holding the read end of a pipe. A job that ends
through Python, successfully or not, writes ``done`` into it first; a pipe that closes without it
means the job was killed or crashed in native code. The watcher then looks at the job's memory
cgroup: if its out-of-memory kill count grew, the log says which limit was hit and what to
raise; otherwise it says the job ended abruptly, and how to tell whether memory was the cause.

The out-of-memory killer picks the largest process of the cgroup: the job, never its watcher.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import IO

from moeforge.runtime.memory_budget import cgroup_memory_limit, gib, oom_kills

_DONE = b"done\n"


class Watcher:
    """The running watcher of one job, as a context: leaving it, however the job ends in Python
    (return, exception, ``sys.exit``), tells the watcher to go quietly."""

    def __init__(self, log_path: Path, rule: str, mem_mb: int | None) -> None:
        command = [sys.executable, "-m", "moeforge.killed_job", str(log_path), rule, str(mem_mb or "")]
        # Its own stdout/stderr are the job's: what it writes reaches the console like the job's output.
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done()

    def done(self) -> None:
        """The job is ending through Python: the watcher leaves quietly."""
        stdin: IO[bytes] | None = self._process.stdin
        if stdin is None or stdin.closed:
            return
        try:
            stdin.write(_DONE)
            stdin.close()
        except (BrokenPipeError, OSError):
            return  # the watcher is gone already: nothing to tell it
        self._process.wait()


def explanation(rule: str, mem_mb: int | None, kills_before: int, kills_after: int,
                limit: tuple[int, Path] | None) -> str:
    """The log's last line for a job that ended without reporting: out of memory when the cgroup says so."""
    asked = f"it asked for {mem_mb} MB" if mem_mb else "it asked for no mem_mb"
    raise_it = f"--set-resources {rule}:mem_mb=N with N above what it needs ({asked})"
    if rule in ("smoke_test", "verify"):
        raise_it += ", or set smoke.memory_gb to what the job may really use, so generation is skipped"
    if kills_after > kills_before:
        where = f"the memory limit of {gib(limit[0])} set in {limit[1]}" if limit else "its memory limit"
        return (f"{rule}: killed by the kernel's out-of-memory killer at {where}. Give the job more memory: "
                f"{raise_it}.")
    return (f"{rule}: the job ended abruptly, without reporting (killed by a signal, or a crash inside a native "
            f"library). If the system ran out of memory (the kernel log, dmesg, shows 'Out of memory'), give the "
            f"job more memory: {raise_it}. Otherwise rerun it; finished outputs are kept.")


def watch(log_path: Path, rule: str, mem_mb: int | None) -> None:
    """Wait for the job's word; if the pipe closes without it, append the explanation to the log."""
    kills_before = oom_kills()
    if sys.stdin.buffer.read() == _DONE:
        return
    message = "ERROR moeforge: " + explanation(rule, mem_mb, kills_before, oom_kills(), cgroup_memory_limit())
    print(message, file=sys.stderr, flush=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(message + "\n")


if __name__ == "__main__":
    watch(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if sys.argv[3] else None)
