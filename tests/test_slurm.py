"""The workflow through a real single-node SLURM cluster, with the shipped profiles/slurm.

A unit test cannot show that a profile works: the SLURM executor plugin, sbatch, the job step's
nested srun and the shared working directory only meet on a real scheduler. tests/slurm/cluster.sh
starts one on this machine (no accounting daemon, like many small sites), and these tests build the
demo merge through it, prove that every non-local job went through SLURM, and that the bytes equal
a local build's; and a two-candidate search, whose candidates run as parallel SLURM jobs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from moeforge.plan.plan_json import read_plan

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
PROFILE = REPO / "profiles" / "slurm"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
MODEL = "results/demo/model"
LOCK = f"{MODEL}/moeforge.lock.json"
STAGING = "results/demo/staging/model"
# The end-to-end target: the assembled (staging) model and its smoke test (strict load and generation).
TARGET = "results/demo/smoke/report.json"
# Rules that run on the submit host (`localrule: True` in workflow/rules/); everything else is a
# SLURM job.
LOCAL_RULES = {"demo_models", "demo_texts", "fetch_metadata", "locate_weights", "fetch_weights", "translate_config",
               "class_check"}
REMOTE_RULES = {"hash_source", "validate", "gates", "shard", "routers_shard", "train_routers", "assemble", "smoke_test"}
# Rules with one job per source model (the demo merges a base and three experts).
PER_SOURCE_RULES = {"hash_source": 4}
# The profile's polling suits a shared cluster (first status check 20 s after submission); on this
# idle private cluster a 2 s check keeps the test short. MinJobAge=600 in cluster.sh's slurm.conf
# keeps finished jobs visible to squeue, so the plugin's squeue status command stays in use.
FAST_POLLING = ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2"]
# The private cluster's one node has this machine's CPUs; a job asking for more (gates declares up to 4
# threads) would be rejected, as on any site whose nodes are smaller than a rule's threads.
NODE_CPUS = str(len(os.sched_getaffinity(0)))
ON_THIS_NODE = ["--max-threads", NODE_CPUS]
RUN_TIMEOUT = 900

SUBMITTED = re.compile(r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.")
JOB_HEADER = re.compile(r"^\s*(localrule|rule|localcheckpoint|checkpoint) (\w+):$")
JOB_ID = re.compile(r"^\s*jobid: (\d+)$")


def slurm_installed() -> bool:
    """The Debian packages put the daemons in /usr/sbin, which a user's PATH may lack."""
    return all(shutil.which(tool) or Path("/usr/sbin", tool).is_file() for tool in ("slurmctld", "slurmd", "sbatch"))


def need(condition: bool, reason: str) -> None:
    """Skip on a developer machine, but fail under CI: CI installs SLURM and must run these tests."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the SLURM tests must run; see tests/slurm/install.sh)")
    pytest.skip(reason)


def workdir(path: Path) -> Path:
    """A working directory with a config naming the demo recipe: the repository's results/ stay untouched."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "config" / "recipes" / "demo.yaml", path / "demo.yaml")
    (path / "config.yaml").write_text(yaml.safe_dump({"merges": {"demo": {"recipe": "demo.yaml"}}}))
    return path


@dataclass
class Run:
    """A finished snakemake run: its working directory, combined output and wall time."""

    wd: Path
    returncode: int
    log: str
    seconds: float


def snakemake(wd: Path, targets: list[str], args: list[str], env: dict[str, str] | None = None) -> Run:
    """Run snakemake on the repository's Snakefile in `wd`, under a hard kill-after timeout.

    Targets go first: list-valued options such as --group-components would swallow them.
    `timeout -k` because a stuck executor must never hang CI; the log is kept in `wd` for diagnosis.
    """
    cmd = ["timeout", "-k", "10", str(RUN_TIMEOUT), *SNAKEMAKE, *targets, "-s", str(REPO / "Snakefile"),
           "-d", str(wd), "--configfile", str(wd / "config.yaml"), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=RUN_TIMEOUT + 60)
    seconds = time.monotonic() - start
    (wd / "snakemake.out").write_text(proc.stdout)
    return Run(wd=wd, returncode=proc.returncode, log=proc.stdout, seconds=seconds)


def jobs_in(log: str) -> dict[str, tuple[str, str]]:
    """Snakemake job id -> (kind, rule) for every job the log announces (kind: rule, localrule, ...)."""
    jobs: dict[str, tuple[str, str]] = {}
    header: tuple[str, str] | None = None
    for line in log.splitlines():
        if match := JOB_HEADER.match(line):
            header = (match[1], match[2])
        elif header and (match := JOB_ID.match(line)):
            jobs[match[1]] = header
            header = None
    return jobs


def submissions(log: str) -> dict[str, tuple[str, Path]]:
    """Snakemake job (or group) id -> (SLURM job id, SLURM log file), from the executor's messages."""
    return {m[1]: (m[2], Path(m[3])) for m in SUBMITTED.finditer(log)}


def squeue_rows(job_ids: list[str], env: dict[str, str]) -> dict[str, dict[str, str]]:
    """SLURM's own record of the jobs: name (the run's id), comment (rule and wildcards), state.

    Without slurmdbd there is no sacct; slurmctld keeps finished jobs for MinJobAge seconds.
    """
    out = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%j|%k|%T", "--jobs", ",".join(job_ids)],
                         capture_output=True, text=True, env=env, timeout=30, check=True).stdout
    rows = {}
    for line in out.splitlines():
        jobid, name, comment, state = line.strip().split("|")
        rows[jobid] = {"name": name, "comment": comment, "state": state}
    return rows


def jobcomp_states(state_dir: Path) -> dict[str, str]:
    """Job id -> final state from slurmctld's job completion log (jobcomp/filetxt): a second witness."""
    path = state_dir / "log" / "jobcomp.log"
    text = path.read_text() if path.is_file() else ""
    return dict(re.findall(r"JobId=(\d+) .*?JobState=(\S+)", text))


def sha256_tree(model: Path) -> dict[str, str]:
    """Every file of a model directory by name, hashed: the bytes two builds must share."""
    from moeforge.io.files import sha256_file

    return {p.name: sha256_file(p) for p in sorted(model.iterdir()) if p.is_file()}


def assert_lock_matches_files(model: Path) -> dict[str, str]:
    """The lock file's `files` must describe the directory exactly; returns the full tree's hashes."""
    tree = sha256_tree(model)
    lock = json.loads((model / "moeforge.lock.json").read_text())
    assert lock["files"] == {k: v for k, v in tree.items() if k != "moeforge.lock.json"}
    return tree


@dataclass
class Cluster:
    """A running cluster: the environment that reaches it and its state directory."""

    env: dict[str, str]
    state_dir: Path


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Start the private cluster (or reuse one already up in the same state directory); stop it after.

    A cluster that was running before the tests is left running: it belongs to whoever started it.
    """
    need(slurm_installed(), "SLURM is not installed (run tests/slurm/install.sh)")
    need(os.geteuid() == 0, "the private SLURM cluster needs root (slurmd starts jobs as their owner)")
    env = dict(os.environ)
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    conf = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True, env=env, check=True, timeout=30)
    env["SLURM_CONF"] = conf.stdout.strip().removeprefix("export SLURM_CONF=")
    state_dir = Path(env["SLURM_CONF"]).parent.parent
    already_up = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, env=env, timeout=60).returncode == 0
    try:
        if not already_up:
            start = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, env=env,
                                   timeout=180)
            assert start.returncode == 0, f"cluster.sh start failed:\n{start.stdout}\n{start.stderr}"
        yield Cluster(env=env, state_dir=state_dir)
    finally:
        # Also after a failed start: the daemons that did come up must not outlive the tests.
        if not already_up:
            subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def local_build(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The same demo built with the local executor: the reference for the bytes."""
    run = snakemake(workdir(tmp_path_factory.mktemp("local")), [TARGET], ["--cores", "2"])
    assert run.returncode == 0, run.log[-4000:]
    return run


@pytest.fixture(scope="module")
def slurm_build(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The demo built through SLURM with the shipped profile (SLURM logs kept for the checks)."""
    wd = workdir(tmp_path_factory.mktemp("slurm"))
    run = snakemake(wd, [TARGET], ["--executor", "slurm", "--workflow-profile", str(PROFILE), *ON_THIS_NODE,
                                   *FAST_POLLING, "--slurm-keep-successful-logs"], env=cluster.env)
    assert run.returncode == 0, run.log[-6000:]
    return run


def test_every_profile_key_is_commented() -> None:
    """Users adapt the profile to their site: each setting must say what it does."""
    lines = (PROFILE / "config.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z][\w-]*:", line) or re.match(r"^  [A-Za-z_][\w-]*:", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"profiles/slurm/config.yaml:{i + 1}: '{line.strip()}' has no comment above"
    profile = yaml.safe_load("\n".join(lines))
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"


def test_profile_dry_runs_without_a_cluster(tmp_path: Path) -> None:
    """The profile can be checked on any machine with the plugin: `-n` contacts no scheduler."""
    env = dict(os.environ)
    env["SLURM_CONF"] = str(tmp_path / "no-such-slurm.conf")
    run = snakemake(workdir(tmp_path / "wd"), [TARGET],
                    ["-n", "--executor", "slurm", "--workflow-profile", str(PROFILE)], env=env)
    assert run.returncode == 0, run.log[-4000:]
    assert f"Using workflow specific profile {PROFILE}" in run.log
    rules = {rule for _, rule in jobs_in(run.log).values()}
    # Before the validate checkpoint has run, the shards and the gates (named by what the plan holds) are not
    # yet in the DAG.
    assert {"demo_models", "fetch_metadata", "validate", "translate_config", "assemble", "smoke_test"} <= rules
    assert "cpus_per_task=" in run.log
    assert not (tmp_path / "wd" / "results").exists()


def test_every_compute_job_ran_through_slurm(slurm_build: Run, cluster: Cluster) -> None:
    """Local rules stay on the submit host; every other job is a COMPLETED SLURM job."""
    jobs = jobs_in(slurm_build.log)
    local = {job: rule for job, (kind, rule) in jobs.items() if kind.startswith("local")}
    remote = {job: rule for job, (kind, rule) in jobs.items() if not kind.startswith("local")}
    assert set(local.values()) <= LOCAL_RULES, local
    assert set(remote.values()) == REMOTE_RULES, remote
    plan = read_plan(slurm_build.wd / "results/demo/plan.json")
    # every shard is a job of its own, the routers' included
    assert sorted(remote.values()).count("shard") == len(plan.shard_keys) == len(plan.shards) - 1
    assert sorted(remote.values()).count("routers_shard") == 1

    submitted = submissions(slurm_build.log)
    assert set(submitted) == set(remote), "jobs run outside SLURM or submitted twice"
    slurm_ids = {job: slurm_id for job, (slurm_id, _) in submitted.items()}
    assert len(set(slurm_ids.values())) == len(slurm_ids)

    rows = squeue_rows(list(slurm_ids.values()), cluster.env)
    assert set(rows) == set(slurm_ids.values()), "SLURM does not know a job the log reports"
    assert len({row["name"] for row in rows.values()}) == 1, "all jobs of one run share the run's id as name"
    completed = jobcomp_states(cluster.state_dir)
    for job, slurm_id in slurm_ids.items():
        rule = remote[job]
        assert rows[slurm_id]["state"] == "COMPLETED", (rule, rows[slurm_id])
        assert rows[slurm_id]["comment"].startswith(f"rule_{rule}_"), (rule, rows[slurm_id])
        assert completed.get(slurm_id) == "COMPLETED", (rule, slurm_id)
        slurm_log = submitted[job][1].read_text()
        assert re.search(rf"^\s*(rule|checkpoint) {rule}:$", slurm_log, re.M), f"{rule}: not run in SLURM job {slurm_id}"
    print(f"\nSLURM build: {slurm_build.seconds:.1f} s wall, {len(slurm_ids)} SLURM jobs")


def test_slurm_build_is_byte_identical_to_local(slurm_build: Run, local_build: Run) -> None:
    """Where a job runs must not change a single byte of the model (lock file included)."""
    slurm_tree = assert_lock_matches_files(slurm_build.wd / STAGING)
    local_tree = assert_lock_matches_files(local_build.wd / STAGING)
    assert slurm_tree == local_tree
    assert "SLURM jobid" not in local_build.log
    report = json.loads((slurm_build.wd / TARGET).read_text())
    assert report["passed"] is True
    print(f"\nlocal build: {local_build.seconds:.1f} s wall; SLURM build: {slurm_build.seconds:.1f} s wall")


def test_grouped_shards_share_one_allocation(cluster: Cluster, local_build: Run,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """The profile's grouping recipe: all shard jobs in one SLURM job, same bytes.

    `--cores` caps the group's allocation at this node's CPUs; without it the group asks for the
    sum of its jobs' threads and waits forever for a node that large.
    """
    wd = workdir(tmp_path_factory.mktemp("grouped"))
    run = snakemake(wd, [LOCK], ["--executor", "slurm", "--workflow-profile", str(PROFILE), *ON_THIS_NODE,
                                 *FAST_POLLING, "--groups", "shard=shards", "--group-components", "shards=8",
                                 "--cores", NODE_CPUS], env=cluster.env)
    assert run.returncode == 0, run.log[-6000:]
    logs = [str(path) for _, path in submissions(run.log).values()]
    grouped = [p for p in logs if "/group_shards_shard/" in p]
    assert len(grouped) == 1, logs
    assert not [p for p in logs if "/rule_shard/" in p], logs
    per_merge = REMOTE_RULES - {"shard"} - set(PER_SOURCE_RULES)  # publish is a local rule
    assert len(logs) == len(per_merge) + sum(PER_SOURCE_RULES.values()) + 1, logs
    assert assert_lock_matches_files(wd / MODEL) == sha256_tree(local_build.wd / STAGING)
    print(f"\ngrouped SLURM build: {run.seconds:.1f} s wall, {len(logs)} SLURM jobs")


def jobcomp_times(state_dir: Path) -> dict[str, tuple[datetime, datetime]]:
    """Job id -> (start, end) from slurmctld's job completion log."""
    path = state_dir / "log" / "jobcomp.log"
    text = path.read_text() if path.is_file() else ""
    return {job: (datetime.fromisoformat(start), datetime.fromisoformat(end))
            for job, start, end in re.findall(r"JobId=(\d+) .*?StartTime=(\S+) EndTime=(\S+)", text)}


def test_a_search_runs_its_candidates_as_parallel_slurm_jobs(cluster: Cluster,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two candidates of a search: each one's compute jobs are SLURM jobs, the two candidates' jobs run at the
    same time, and the ranking (a local job) ranks both."""
    wd = tmp_path_factory.mktemp("search")
    shutil.copyfile(REPO / "config" / "recipes" / "demo.yaml", wd / "demo.yaml")
    search = {"recipe": "demo.yaml", "grid": {"experts_per_token": [1, 2]}}
    (wd / "config.yaml").write_text(yaml.safe_dump({"searches": {"two": search}}))
    run = snakemake(wd, ["search"], ["--executor", "slurm", "--workflow-profile", str(PROFILE), *ON_THIS_NODE,
                                     *FAST_POLLING, "--slurm-keep-successful-logs"], env=cluster.env)
    assert run.returncode == 0, run.log[-6000:]
    submitted = submissions(run.log)
    remote = {job: rule for job, (kind, rule) in jobs_in(run.log).items() if not kind.startswith("local")}
    assert set(submitted) == set(remote), "jobs run outside SLURM or submitted twice"
    assert "rank_search" not in remote.values() and "evaluate" in remote.values()
    times = jobcomp_times(cluster.state_dir)
    # The plugin names each job's log directory after its wildcard values, joined by "_".
    per_candidate = {merge: [times[slurm_id] for slurm_id, log in submitted.values()
                             if log.parent.name == merge or log.parent.name.startswith(f"{merge}_")]
                     for merge in ("two-k1", "two-k2")}
    for merge, spans in per_candidate.items():
        # validate, router training, the routers shard, assemble, smoke test, evaluation: each candidate's own
        # SLURM jobs (the gates, the other shards and the dense scores they share)
        assert len(spans) >= 6, (merge, submitted)
    assert any(a_start < b_end and b_start < a_end for a_start, a_end in per_candidate["two-k1"]
               for b_start, b_end in per_candidate["two-k2"]), f"the candidates' jobs never overlapped: {per_candidate}"
    ranking = json.loads((wd / "results/search/two/ranking.json").read_text())
    assert sorted(row["merge"] for row in ranking["candidates"]) == ["two-k1", "two-k2"]
    print(f"\nSLURM search of 2 candidates: {run.seconds:.1f} s wall, {len(submitted)} SLURM jobs")
