"""A job killed without a word (SIGKILL, the out-of-memory killer) still leaves the reason in its log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.runtime.memory_cap import run_capped

#: A workflow step as the runner runs it, with the rule name and mem_mb Snakemake gives a script.
STEP = """
import os, signal, sys, types
from moeforge.runner import run

def step(smk):
    print("loading the whole model", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[2] == "allocate":
        hog = bytearray(600 << 20)
        hog[:: 4096] = b"x" * len(hog[:: 4096])  # touch every page: resident, not just reserved
    print("finished", flush=True)

smk = types.SimpleNamespace(log=[sys.argv[1]], rule="smoke_test", resources=types.SimpleNamespace(mem_mb=1234))
run(smk, step)
"""


def _command(log: Path, action: str) -> list[str]:
    return [sys.executable, "-c", STEP, str(log), action]


def test_a_killed_job_says_so_in_its_log(tmp_path):
    log = tmp_path / "smoke_test.log"
    proc = subprocess.run(_command(log, "kill"), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == -9
    text = log.read_text(encoding="utf-8")
    assert text.startswith("loading the whole model\n")
    last = text.splitlines()[-1]
    assert last.startswith("ERROR moeforge: smoke_test: the job ended abruptly"), text
    assert "--set-resources smoke_test:mem_mb=N" in last and "it asked for 1234 MB" in last
    assert "smoke.memory_gb" in last
    assert last in proc.stderr  # on the console too, where Snakemake shows the failure


def test_a_job_that_ends_normally_leaves_no_message(tmp_path):
    log = tmp_path / "smoke_test.log"
    proc = subprocess.run(_command(log, "return"), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0
    assert log.read_text(encoding="utf-8") == "loading the whole model\nfinished\n"
    assert "ERROR" not in proc.stderr


def test_an_out_of_memory_kill_names_the_limit_it_hit(tmp_path):
    """A real kernel-enforced cap (a memory cgroup made for the test), 600 MB allocated under 250 MiB."""
    log = tmp_path / "smoke_test.log"
    try:
        result = run_capped(_command(log, "allocate"), 250 << 20, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        message = f"cannot make a memory cgroup here ({exc}); this test needs root and a cgroup memory controller"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert result.returncode == -9 and result.killed_for_memory
    last = log.read_text(encoding="utf-8").splitlines()[-1]
    assert last.startswith("ERROR moeforge: smoke_test: killed by the kernel's out-of-memory killer at the memory "
                           "limit of 0.24 GiB set in "), last
    assert "--set-resources smoke_test:mem_mb=N" in last
