"""A build killed with SIGKILL at any point resumes to the same bytes, without redoing finished work."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moeforge.plan.plan_json import read_plan
from pipeline import sha256_tree
from test_workflow import MODEL, REPO, SNAKEMAKE, snakemake, workdir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = workdir(tmp_path_factory.mktemp("reference"))
    proc = snakemake(wd, "--cores", "2", f"{MODEL}/moeforge.lock.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sha256_tree(wd / MODEL)


def run_until(wd: Path, marker: str, count: int = 1, timeout: float = 300) -> None:
    """Start the build and SIGKILL its whole process group as soon as `count` files match `marker`."""
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(wd), "--configfile", str(wd / "config.yaml"),
           "--cores", "2", f"{MODEL}/moeforge.lock.json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while len(list(wd.glob(marker))) < count:
            assert proc.poll() is None, f"the build ended before {marker} appeared"
            assert time.monotonic() < deadline, f"{marker} did not appear in {timeout}s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def resume(wd: Path) -> subprocess.CompletedProcess:
    unlock = snakemake(wd, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    proc = snakemake(wd, "--cores", "2", f"{MODEL}/moeforge.lock.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def no_temporaries(wd: Path) -> list[Path]:
    return [p for p in wd.rglob(".*.tmp-*")]


@pytest.mark.parametrize("marker", ["logs/fetch_metadata/*.log", "logs/gates/*.log", "logs/demo/assemble.log",
                                    "logs/demo/smoke_test.log"],
                         ids=["fetch", "gates", "assemble", "smoke"])
def test_killed_build_resumes_to_identical_bytes(tmp_path, reference, marker):
    wd = workdir(tmp_path)
    run_until(wd, marker)
    assert not (wd / MODEL / "moeforge.lock.json").exists()  # nothing half-built looks complete
    resume(wd)
    assert sha256_tree(wd / MODEL) == reference
    assert no_temporaries(wd) == []


def test_killed_during_shards_keeps_finished_shards(tmp_path, reference):
    wd = workdir(tmp_path)
    # Kill as the last of the demo's three shards (globals, layers, routers) writes its digest, a job's last
    # act: with two cores, at most two jobs are in flight, so at least one shard job has completed.
    # The globals and layers shards are keyed by content (results/shards/), the routers the merge's.
    run_until(wd, "results/**/shards/*.sha256", count=3)
    done = {p.name: p.stat().st_ino for p in wd.glob("results/**/shards/*.safetensors")}
    assert len(done) == 3, done
    proc = resume(wd)
    assert sha256_tree(wd / MODEL) == reference
    # Assembly hard-links shards into the staging model, and publishing its files into model/: a shard that
    # was not redone keeps its inode there.
    plan = read_plan(wd / "results/demo/plan.json")
    order = [f"{plan.shard_keys.get(shard, shard)}.safetensors" for shard in plan.shards]
    kept = [name for name, inode in done.items()
            if (wd / MODEL / f"model-{order.index(name) + 1:05d}-of-{len(order):05d}.safetensors").stat().st_ino == inode]
    in_flight_at_kill = 2  # with --cores 2, at most two shard jobs may have been cut off mid-registration
    assert len(kept) >= len(done) - in_flight_at_kill, (done, kept, proc.stdout[-2000:])
    assert no_temporaries(wd) == []
