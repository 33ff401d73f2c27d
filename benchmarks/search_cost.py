"""What does a search cost beside one merge? Six gate candidates against one, by wall time and jobs run.

The target: six candidates that vary only ``gate_mode`` x ``experts_per_token`` cost at most 2.5x one
candidate's wall. They can, because what they share is done once: every shard but the routers is
named by its content (``results/shards/<key>.safetensors``) and built by one job for all of them, and
each dense model (the base, each expert) is scored once for every candidate's evaluation. What each
candidate still does alone: its gates, its router training (the demo recipe trains its routers layer
by layer), its routers shard, assembly, smoke test and evaluation.

Two searches over the demo recipe (``config/recipes/demo.yaml``), each by the real workflow
(``snakemake search``) in a fresh working directory into which the demo models, built once by
``snakemake demo_models``, are copied (so building them is not counted):

* **one**: a grid of single-value lists, ``gate_mode: [router_input]``, ``token_reduction: [null]``,
  ``experts_per_token: [2]``: one candidate, itself one of the six below;
* **six**: ``gate_mode: [router_input, hidden_avg, cheap_embed]`` x ``experts_per_token: [1, 2]``
  (``token_reduction: [null]``: the demo's ``mean`` is for ``router_input`` only).

Reported: each search's wall seconds (the whole ``snakemake`` command, ranking included) in
``--runs`` pairs (one, then six, back to back; the machine's speed drifts by more than the effect
measured), the ratio of the median walls against the target and each pair's, and the jobs each rule
ran with their summed seconds in the median run (Snakemake's own log of the run), which shows the shared jobs (``shard``, ``score_dense``, ...) running as often in both
and where the rest of the wall goes.

    python benchmarks/search_cost.py                      # writes the section into benchmarks/README.md
    python benchmarks/search_cost.py --note "..."         # a sentence on the machine's load, into the section

Results: ``benchmarks/results/search_cost.json`` and the README section between the search-cost markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from readme_section import write_readme_section

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
RESULTS = REPO / "benchmarks" / "results" / "search_cost.json"
BEGIN, END = "<!-- search-cost:begin -->", "<!-- search-cost:end -->"
DEMO = Path("resources") / "demo"
#: What the demo's models and training texts are built by, once, outside the timed runs.
DEMO_TARGETS = ["demo_models", *(str(DEMO / "texts" / f"{d}.txt") for d in ("code", "math", "cooking"))]
#: The target: the six-candidate search's wall / the one-candidate search's.
TARGET = 2.5
#: case -> the search's grid over the demo recipe.
GRIDS: dict[str, dict[str, list[Any]]] = {
    "one": {"gate_mode": ["router_input"], "token_reduction": [None], "experts_per_token": [2]},
    "six": {"gate_mode": ["router_input", "hidden_avg", "cheap_embed"], "token_reduction": [None],
            "experts_per_token": [1, 2]},
}
#: The lines of Snakemake's log that time its jobs: a timestamp, a job's rule and id, a finished job.
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ [\d:]{8} \d{4})\]$")
STARTED = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def snakemake(work: Path, cores: int, *args: str) -> None:
    """Run the repository's workflow in ``work`` (its stdout and stderr go to the terminal)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
               "--cores", str(cores), *args]
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL)


def build_demo(work: Path, cores: int) -> Path:
    """The demo's models and texts, built once under ``work/demo`` (reused when there)."""
    root = work / "demo"
    shutil.copytree(REPO / "config", root / "config", dirs_exist_ok=True)
    snakemake(root, cores, *DEMO_TARGETS)
    return root / DEMO


def fresh_workdir(work: Path, case: str, demo: Path) -> Path:
    """An empty working directory with the config, the demo models copied in, and the case's search config."""
    wd = work / case
    shutil.rmtree(wd, ignore_errors=True)
    shutil.copytree(REPO / "config", wd / "config")
    shutil.copytree(demo, wd / DEMO)
    search = {"recipe": "config/recipes/demo.yaml", "grid": GRIDS[case]}
    (wd / "search.yaml").write_text(yaml.safe_dump({"searches": {f"cost-{case}": search}}, sort_keys=False))
    return wd


def jobs_per_rule(wd: Path) -> dict[str, dict[str, float]]:
    """Each rule's finished jobs and their summed wall seconds, from Snakemake's log of the run in ``wd``.

    The log stamps every job's start and end to the second; two jobs run at once on two cores, so the
    seconds add up to more than the run's wall. They show where the wall goes, not a second measurement of it.
    """
    (log,) = (wd / ".snakemake" / "log").glob("*.snakemake.log")
    now, rule, started = 0.0, "", {}
    jobs: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        if stamp := STAMP.match(line):
            now = time.mktime(time.strptime(stamp[1], "%a %b %d %H:%M:%S %Y"))
        elif start := STARTED.match(line):
            rule = start[1]
        elif jobid := JOBID.match(line):
            started[jobid[1], rule] = now
        elif finished := FINISHED.match(line):
            # Keyed by rule too: Snakemake numbers the jobs again when it re-reads the DAG mid-run.
            name = finished[2]
            begun = started.pop((finished[1], name))
            jobs[name] += 1
            seconds[name] += now - begun
    return {name: {"jobs": jobs[name], "job_s": seconds[name]} for name in sorted(jobs)}


def run_case(work: Path, case: str, demo: Path, cores: int) -> dict[str, Any]:
    """One search from scratch: its wall, the load around it, the jobs each rule ran, its candidates."""
    wd = fresh_workdir(work, case, demo)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    snakemake(wd, cores, "search", "--configfile", str(wd / "search.yaml"))
    wall = time.monotonic() - started
    ranking = json.loads((wd / f"results/search/cost-{case}/ranking.json").read_text())
    return {
        "grid": GRIDS[case],
        "candidates": [entry["merge"] for entry in ranking["candidates"]],
        "wall_s": round(wall, 2),
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "jobs": jobs_per_rule(wd),
    }


def median_cases(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each case's run of median wall (its jobs table with it), with every run's wall beside it.

    The machine's speed drifts between runs by more than the difference under test, so the ratio quoted is the
    medians' and each pair's ratio (one, then six, back to back) is kept too."""
    cases = {}
    for case in GRIDS:
        walls = [run[case]["wall_s"] for run in runs]
        cases[case] = {**sorted((run[case] for run in runs), key=lambda c: c["wall_s"])[len(runs) // 2],
                       "walls_s": walls}
    return cases


def table(cases: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per rule, the jobs it ran in each search and their summed seconds."""
    rules = sorted({rule for case in cases.values() for rule in case["jobs"]})
    heads = [f"{name} ({len(c['candidates'])} cand.): {what}" for name, c in cases.items() for what in ("jobs", "s")]
    lines = ["| rule | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    empty = {"jobs": 0, "job_s": 0.0}
    for rule in rules:
        cells = [c["jobs"].get(rule, empty) for c in cases.values()]
        lines.append(f"| {rule} | " + " | ".join(f"{cell['jobs']} | {cell['job_s']:.0f}" for cell in cells) + " |")
    totals = [(sum(r["jobs"] for r in c["jobs"].values()), sum(r["job_s"] for r in c["jobs"].values()))
              for c in cases.values()]
    lines.append("| **all** | " + " | ".join(f"{jobs} | {secs:.0f}" for jobs, secs in totals) + " |")
    return "\n".join(lines) + "\n"


def split_line(cases: dict[str, dict[str, Any]]) -> str:
    """A line splitting the jobs' seconds into rules run as often in both searches (shared) and the others."""
    one, six = cases["one"]["jobs"], cases["six"]["jobs"]
    shared = {rule for rule in one if six.get(rule, {}).get("jobs") == one[rule]["jobs"]}

    def total(jobs: dict[str, dict[str, float]], rules: set[str], inside: bool) -> float:
        return sum(entry["job_s"] for rule, entry in jobs.items() if (rule in rules) == inside)

    return (f"- jobs' seconds, one -> six: rules with as many jobs in both ({', '.join(sorted(shared))}) "
            f"{total(one, shared, True):.0f} -> {total(six, shared, True):.0f} s; every other rule "
            f"{total(one, shared, False):.0f} -> {total(six, shared, False):.0f} s\n")


def walls(case: dict[str, Any]) -> str:
    return ", ".join(f"{wall:.1f}" for wall in case["walls_s"]) + " s"


def section(result: dict[str, Any]) -> str:
    """The README section: what was measured, how to rerun it, the numbers."""
    one, six = result["cases"]["one"], result["cases"]["six"]
    verdict = "met" if result["ratio"] <= TARGET else "missed"
    note = f" {result['note']}" if result["note"] else ""
    return (
        "## Search cost\n\n"
        f"Measured {result['date']} ({result['cores']} cores; {len(result['pair_ratios'])} pairs of runs, one then six, "
        f"each search from scratch).{note}\n\n"
        "`python benchmarks/search_cost.py` runs two searches over the demo recipe with `snakemake search`, each in a fresh working directory with the "
        "demo models copied in (their building is not counted): **one** candidate (`gate_mode: [router_input]`, "
        "`token_reduction: [null]`, `experts_per_token: [2]`) and **six** (`gate_mode: [router_input, hidden_avg, "
        "cheap_embed]` x `experts_per_token: [1, 2]`). Every candidate trains its routers (the demo recipe's "
        "`router_training: layerwise`), is smoke-tested and evaluated; the wall is the whole command's, "
        "ranking included.\n\n"
        f"- one candidate: median {one['wall_s']:.1f} s of {walls(one)}\n"
        f"- six candidates: median {six['wall_s']:.1f} s of {walls(six)}\n"
        f"- six / one = {result['ratio']:.2f} (medians; each pair: {', '.join(f'{r:.2f}' for r in result['pair_ratios'])}) "
        f"(target <= {TARGET}): {verdict}\n"
        + split_line(result["cases"]) + "\n"
        "Jobs per rule and their summed wall seconds in each case's median run (Snakemake's log of the run, stamped to the second; two "
        "jobs run at once, so the seconds add up to more than the wall):\n\n" + table(result["cases"])
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".data" / "search_cost")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--note", default="", help="a sentence on the machine's state, into the README section")
    parser.add_argument("--runs", type=int, default=3, help="pairs of searches (one, then six), each from scratch")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    demo = build_demo(work, args.cores)
    runs = [{case: run_case(work, case, demo, args.cores) for case in GRIDS} for _ in range(args.runs)]
    cases = median_cases(runs)
    result = {
        "date": datetime.date.today().isoformat(),
        "cores": args.cores,
        "cpu_count": os.cpu_count(),
        "note": args.note,
        "target": TARGET,
        "ratio": round(cases["six"]["wall_s"] / cases["one"]["wall_s"], 3),
        "pair_ratios": [round(run["six"]["wall_s"] / run["one"]["wall_s"], 3) for run in runs],
        "cases": cases,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_readme_section(README, BEGIN, END, section(result))
    print(section(result))


if __name__ == "__main__":
    main()
