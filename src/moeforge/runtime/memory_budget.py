"""How much memory a job may use: the limit it runs under, never the machine's size.

A process that outgrows its cgroup is killed with SIGKILL: no exception, no message, only an
empty or cut-off log. So a step that could hold a whole model decides beforehand whether it fits,
and says in its log what it assumed. The machine's total RAM is no guide: a cluster job or a
container gets a share of it.

Where the limit comes from, first found wins: the workflow config (``smoke.memory_gb``), the
process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, the smallest along the path
to the root of the hierarchy), the rule's ``mem_mb`` request. Without a cgroup limit nothing
enforces that request (a workstation run), so it is capped by the memory the machine has
available when the job starts (``MemAvailable``, not its total): a 48 GB model's request on a
32 GB machine skips generation instead of being killed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from moeforge.io.progress import GIB

#: cgroup v1 writes "no limit" as 2**63-1 rounded down to a page; anything this large is none.
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class MemoryBudget:
    """A memory limit in bytes (None: none known), where it was read, and how a user raises it.

    ``available``: the machine's available memory when no cgroup limit or config value applies
    (nothing then enforces ``limit``); it caps what a job may load, but is kept apart from ``limit``
    because it changes from moment to moment and the reports built from ``limit`` must not.
    """

    limit: int | None
    source: str
    raise_how: str
    available: int | None = None

    @property
    def bound(self) -> int | None:
        """The most a job may hold: the tighter of the limit and, where nothing enforces it, the available
        memory (None when neither is known)."""
        return min((b for b in (self.limit, self.available) if b is not None), default=None)

    def allows(self, need: int) -> bool:
        """Whether ``need`` bytes fit both the limit and, where nothing enforces it, the available memory."""
        return self.bound is None or need <= self.bound


def memory_budget(memory_gb: float | None = None, job_mem_mb: int | None = None, *,
                  rule: str = "smoke_test", setting: str = "smoke.memory_gb in the workflow config",
                  proc_cgroup: Path = Path("/proc/self/cgroup"),
                  cgroup_root: Path = Path("/sys/fs/cgroup"),
                  meminfo: Path = Path("/proc/meminfo")) -> MemoryBudget:
    """The budget of this process: the setting's value, else its cgroup limit, else the job's mem_mb; without a
    cgroup limit or setting, also the machine's available memory (``MemoryBudget.available``). ``rule`` and
    ``setting`` name the job's rule and the key that sets ``memory_gb``, for the messages."""
    key = setting.split()[0]
    set_resources = f"--set-resources {rule}:mem_mb=N"
    if memory_gb is not None:
        return MemoryBudget(int(memory_gb * GIB), setting, f"raise {setting}")
    found = cgroup_memory_limit(proc_cgroup, cgroup_root)
    if found is not None:
        limit, path = found
        return MemoryBudget(limit, f"the cgroup limit {path}",
                            f"give the job more memory (a cluster profile's {set_resources}), or set "
                            f"{key} when the limit is not the job's own")
    available = available_memory(meminfo)
    if job_mem_mb:
        return MemoryBudget(int(job_mem_mb) << 20, f"the {rule} rule's mem_mb",
                            f"raise the rule's memory ({set_resources}) or set {setting}", available)
    return MemoryBudget(None, f"no cgroup limit, no mem_mb, no {key}", f"set {setting}", available)


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` in bytes: what can be allocated now without swapping (None where unknown)."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key == "MemAvailable" and value.split() and value.split()[0].isdigit():
            return int(value.split()[0]) * 1024
    return None


def cgroup_memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                        cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, Path] | None:
    """The tightest memory limit on this process's cgroup and its ancestors, and the file that sets it.

    ``/proc/self/cgroup`` names the cgroup: ``0::/path`` on v2 (limit in ``memory.max``),
    ``N:memory:/path`` on v1 (``memory/.../memory.limit_in_bytes``). Inside a cgroup namespace the
    path is ``/`` and the mount's root holds the container's own limit; the walk covers both.
    """
    limits = []
    for node, version in memory_cgroups(proc_cgroup, cgroup_root):
        name = "memory.max" if version == 2 else "memory.limit_in_bytes"
        mount = cgroup_root if version == 2 else cgroup_root / "memory"
        for directory in (node, *node.parents):
            limit = _read_limit(directory / name)
            if limit is not None:
                limits.append((limit, directory / name))
            if directory == mount:
                break
    return min(limits, default=None)


def memory_cgroups(proc_cgroup: Path = Path("/proc/self/cgroup"),
                   cgroup_root: Path = Path("/sys/fs/cgroup")) -> list[tuple[Path, int]]:
    """The directories of this process's memory cgroups with their versions (1 or 2); [] if unknown.

    A hybrid system lists both a v1 memory controller and the v2 unified line.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            found.append((cgroup_root / path.strip("/"), 2))
        elif "memory" in controllers.split(","):
            found.append((cgroup_root / "memory" / path.strip("/"), 1))
    return found


def oom_kills(proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """How many processes the kernel's out-of-memory killer has stopped in this process's memory cgroups.

    v2 counts them in ``memory.events`` (``oom_kill N``), v1 in ``memory.oom_control`` (kernel 4.13+).
    A count that grows while a job runs means the job, or a process beside it, hit the limit.
    """
    return sum(oom_kill_count(node, version) for node, version in memory_cgroups(proc_cgroup, cgroup_root))


def oom_kill_count(node: Path, version: int) -> int:
    """The ``oom_kill`` count of one memory cgroup directory (0 when the kernel does not report it)."""
    name = "memory.events" if version == 2 else "memory.oom_control"
    try:
        lines = (node / name).read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def _read_limit(file: Path) -> int | None:
    """A limit file's value in bytes; None when absent, unreadable or unlimited ("max")."""
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or int(text) >= _UNLIMITED:
        return None
    return int(text)


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes."""
    import resource  # Unix only; the workflow imports this module at parse time

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def gib(size: int | float) -> str:
    """A byte count as GiB, for messages."""
    return f"{size / GIB:.2f} GiB"
