"""What does router training cost at 1B-class shapes? The ``train_routers`` job against the ``gates`` job.

The target (docs/training.md): for a 1B-class model, ``layerwise`` router training takes at most twice the
gates stage's time, and its peak memory is one layer plus the activations, whatever the model's size. Both
jobs stream the model one layer at a time, but training runs every training window through every layer
(``tokens_per_expert`` per expert) where the gates run a few prompts, so the question is how its time and
memory grow with the tokens.

Measured with the real workflow (``snakemake``), on seeded random bf16 Llama checkpoints with Hub tensor names
and the fixture tokenizer (``build_speed.py`` writes and caches them), three experts (the first is the base),
``gate_mode: hidden`` on ``build_speed.PROMPTS`` and each expert's ``train_texts`` a packaged domain's train
split (code, math, cooking; repeated when the largest ``tokens_per_expert`` needs more tokens than it has).
One merge per ``tokens_per_expert`` in one working directory, ``router_training: {method: layerwise,
tokens_per_expert: N}``, so the merges share their shards and their one gates job. Each step is a fresh
``snakemake`` command naming its files:

1. the plans, then the shards and configs the training reads: not measured;
2. the gates file: the gates job alone, with the weights evicted from the page cache first;
3. for each ``N``, that merge's ``routers/report.json``: its ``train_routers`` job alone, evicted as well.

Steps 2 and 3 run under a kernel memory cgroup of ``--memory-cap`` when given. Reported per job: wall and CPU
seconds (the job's ``benchmark:`` TSV), its process's peak resident memory (VmHWM, recorded at exit by
``build_speed``'s per-process hook), and under a cap the cgroup's peak (the scheduler's memory and page
cache included, so it reaches the cap whenever the job reads more than the cap holds) and its OOM kills.
Then the ratio train / gates against the 2x target, a linear fit of train seconds over tokens (to the
default 8192 when it is not measured), and the memory floor the design claims: one MoE layer's float32
weights plus the windows' activations (16 bytes x tokens x hidden, docs/training.md) over the start-up
floor (imports and tokenizer, ``gates_memory.py``'s ``imports`` child).

    python benchmarks/train_cost.py                                  # the 1B-class preset, 256 1024 4096 tokens
    python benchmarks/train_cost.py --preset small --tokens 256 1024 --memory-cap 2G --note "..."

Results: ``benchmarks/results/train_cost.json`` and the README section between the train-cost markers.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml
from build_speed import (
    LLAMA_1B,
    SMOLLM2,
    Dims,
    ensure_experts,
    evict,
    fit_line,
    machine_info,
    recipe_document,
    run_measured,
    snakemake_bin,
    weight_files,
)
from gates_memory import CHILDREN, peak_rss_mib
from readme_section import write_readme_section

from moeforge.gates.key import gates_key
from moeforge.io.domains import DOMAINS, domain_text
from moeforge.io.safetensors_file import ITEMSIZE
from moeforge.plan.plan_json import read_plan
from moeforge.runtime.memory_cap import parse_size

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
README = BENCH_DIR / "README.md"
RESULTS = BENCH_DIR / "results" / "train_cost.json"
BEGIN, END = "<!-- train-cost:begin -->", "<!-- train-cost:end -->"
#: The target: train_routers' wall / the gates job's wall.
TARGET = 2.0
#: The recipe default of tokens_per_expert, extrapolated to when not measured.
DEFAULT_TOKENS = 8192
#: Bytes per token and hidden unit the layerwise job holds for its windows (docs/training.md).
ACTIVATION_BYTES = 16
#: Three experts: the 1B-class Llama of build_speed's llama-1b case (Llama 3.2 1B's widths), SmolLM2-135M's
#: shape, and a small model a run of which takes well under a minute on two cores.
PRESETS = {
    "llama-1b": replace(LLAMA_1B, experts=3),
    "smollm2-135m": SMOLLM2,
    "small": Dims(layers=4, hidden=256, intermediate=704, vocab=4096, heads=4, kv_heads=2, experts=3, tied=True),
}


def write_texts(work: Path, tokenizer_json: Path, tokens: int) -> list[str]:
    """Each domain's packaged train split under ``work/texts``, repeated until it holds ``tokens`` tokens for
    the fixture tokenizer; the paths as a recipe names them (relative to the working directory)."""
    from tokenizers import Tokenizer  # the tokenizer library alone: this process stays free of torch

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    paths = []
    for domain in DOMAINS:
        text = domain_text(domain, "train")
        repeat = math.ceil(tokens / len(tokenizer.encode(text).ids))
        path = Path("texts") / f"{domain}.txt"
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text("\n\n".join([text.strip()] * repeat) + "\n", encoding="utf-8")
        paths.append(str(path))
    return paths


def write_config(work: Path, experts: Sequence[Path], texts: Sequence[str], tokens: Sequence[int]) -> Path:
    """One recipe per ``tokens_per_expert`` and the config naming a merge for each (``train-N``)."""
    merges = {}
    for n in tokens:
        recipe = recipe_document(experts[:len(texts)], "hidden")
        recipe["router_training"] = {"method": "layerwise", "tokens_per_expert": n}
        for expert, text in zip(recipe["experts"], texts, strict=True):
            expert["train_texts"] = [text]
        path = work / f"recipe-{n}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        merges[merge_name(n)] = {"recipe": str(path)}
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"merges": merges}))
    return config


def merge_name(tokens: int) -> str:
    return f"train-{tokens}"


def snakemake(work: Path, config: Path, cores: int, args: Sequence[str], log: str, timeout: float,
              cap_bytes: int | None) -> dict[str, Any]:
    """One measured ``snakemake`` command in ``work`` (see ``build_speed.run_measured``): a failure ends the
    benchmark, but under a cap, where being killed for memory is a result. ``--notemp``: the shards are temporary
    files, deleted once the jobs of one command that read them are done, and each merge's training is its own
    command."""
    cmd = [snakemake_bin(), "-s", str(REPO / "Snakefile"), "-d", str(work), "--configfile", str(config),
           "--cores", str(cores), "--notemp", *args]
    return run_measured(cmd, work, work / log, {}, work / "scratch", timeout, cap_bytes,
                        may_fail=cap_bytes is not None)


def job_cost(run: dict[str, Any], rule: str, tsv: Path) -> dict[str, Any]:
    """The one job of ``rule`` a run ran: its benchmark TSV's seconds, CPU seconds and RSS, its process's VmHWM,
    the cgroup's peak and OOM kills when capped, the run's exit and the machine's load around it."""
    jobs = [p for p in run["processes"] if p["rule"] == rule]
    others = sorted({p["rule"] for p in run["processes"] if p["rule"] and p["rule"] != rule})
    if run["returncode"] == 0 and (len(jobs) != 1 or others):
        raise SystemExit(f"expected one {rule} job, got {len(jobs)} (and {others}): see {tsv.parent}")
    out: dict[str, Any] = {"returncode": run["returncode"], "loadavg_1m": [round(x, 2) for x in run["loadavg_1m"]],
                           "command_wall_s": round(run["wall_s"], 2)}
    if tsv.is_file():
        row = next(csv.DictReader(tsv.open(), delimiter="\t"))
        out.update(wall_s=float(row["s"]), cpu_s=float(row["cpu_time"]), tsv_max_rss_mib=float(row["max_rss"]))
    if jobs:
        out["vmhwm_mib"] = round(jobs[0]["rss_mib"], 1)
    if "cap" in run:
        cap = run["cap"]
        out.update(cap_mib=cap["limit_bytes"] / 2**20, oom_kills=cap["oom_kills"],
                   cgroup_peak_mib=None if cap["peak_bytes"] is None else round(cap["peak_bytes"] / 2**20, 1))
    return out


def memory_floor(work: Path, merge: str) -> dict[str, Any]:
    """The design's floor for the layerwise job: one MoE layer's float32 weights and the windows' activations."""
    plan = read_plan(work / "results" / merge / "plan.json")
    report = json.loads((work / "results" / merge / "routers" / "report.json").read_text())
    windows = report["train_windows"] + report["heldout_windows"]
    tokens = windows * report["settings"]["seq_len"]
    layer = plan.layer_bytes * 4 // ITEMSIZE[plan.dtype_out]
    activations = ACTIVATION_BYTES * tokens * plan.hidden_size
    return {"windows": windows, "tokens": tokens, "layer_float32_mib": round(layer / 2**20, 1),
            "activations_mib": round(activations / 2**20, 1), "seconds_in_report": report["seconds"],
            "peak_in_report_mib": report["peak_rss_mib"]}


def extrapolate(train: list[dict[str, Any]]) -> dict[str, Any] | None:
    """train_routers' wall as a line over tokens_per_expert, and its value at the recipe's default."""
    points = [(t["tokens_per_expert"], t["wall_s"]) for t in train if "wall_s" in t]
    if len(points) < 2:
        return None
    intercept, slope = fit_line(points)
    return {"intercept_s": round(intercept, 2), "s_per_1000_tokens": round(1000 * slope, 2),
            "tokens_per_expert": DEFAULT_TOKENS, "wall_s": round(intercept + slope * DEFAULT_TOKENS, 1),
            "measured": DEFAULT_TOKENS in {p[0] for p in points}}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build the inputs, then the three kinds of run; the numbers of each job."""
    dims = PRESETS[args.preset]
    data_dir = args.data_dir.resolve()
    experts = ensure_experts(data_dir, dims, lambda msg: print(msg, flush=True))
    work = data_dir / "runs" / f"train_cost-{args.preset}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    texts = write_texts(work, experts[0] / "tokenizer.json", max(args.tokens))
    config = write_config(work, experts, texts, args.tokens)
    merges = [merge_name(n) for n in args.tokens]
    print(f"{args.preset}: {dims.tag}, {dims.experts} experts; plans, shards and configs (not measured)", flush=True)
    snakemake(work, config, args.cores, [f"results/{m}/plan.json" for m in merges], "validate.log", args.timeout,
              None)
    plans = [read_plan(work / "results" / m / "plan.json") for m in merges]
    shards = sorted({work / "results" / "shards" / f"{key}.safetensors" for p in plans for key in p.shard_keys.values()})
    (key,) = {gates_key(p) for p in plans}  # router training is no input of the gates: one job for every merge
    snakemake(work, config, args.cores, [*(f"results/{m}/config/config.json" for m in merges),
                                         *(str(s.relative_to(work)) for s in shards)], "prepare.log", args.timeout, None)
    evict(weight_files(experts))
    print("gates job", flush=True)
    run = snakemake(work, config, args.cores, [f"results/gates/{key}.safetensors"], "gates.log", args.timeout,
                    args.memory_cap)
    gates = job_cost(run, "gates", work / "results" / "gates" / "benchmarks" / f"{key}.tsv")
    print(f"  {gates}", flush=True)
    train = []
    for n, merge in zip(args.tokens, merges, strict=True):
        evict([*weight_files(experts), *shards, *(work / "results" / "gates").glob("*.safetensors")])
        print(f"train_routers job, tokens_per_expert {n}", flush=True)
        run = snakemake(work, config, args.cores, [f"results/{merge}/routers/report.json"], f"train-{n}.log",
                        args.timeout, args.memory_cap)
        cost = {"tokens_per_expert": n,
                **job_cost(run, "train_routers", work / "results" / merge / "benchmarks" / "train_routers.tsv")}
        if cost["returncode"] == 0:
            cost.update(memory_floor(work, merge))
        if "wall_s" in cost and "wall_s" in gates:
            cost["ratio_to_gates"] = round(cost["wall_s"] / gates["wall_s"], 2)
        print(f"  {cost}", flush=True)
        train.append(cost)
    start_up, _ = peak_rss_mib(CHILDREN["imports"], experts[0])
    return {"preset": args.preset, "dims": asdict(dims), "dense_params": dims.dense_params(),
            "shard_mib": round(sum(p.stat().st_size for p in shards) / 2**20, 1),
            "start_up_rss_mib": round(start_up, 1), "gates": gates, "train": train,
            "extrapolation": extrapolate(train)}


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(result: dict[str, Any]) -> str:
    """Markdown: the gates job, then one row per tokens_per_expert."""
    capped = result["memory_cap_bytes"] is not None
    head = ("| job | tokens/expert | windows | wall s | CPU s | of which training s | train / gates | VmHWM MiB "
            "| floor MiB (start-up + layer fp32 + activations) |" + (" cgroup peak MiB, OOM kills |" if capped else ""))
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---|" + ("---|" if capped else "")]
    start = result["start_up_rss_mib"]

    def row(name: str, job: dict[str, Any], tokens: str, windows: str, ratio: str, floor: str) -> str:
        seconds = [job.get(key) for key in ("wall_s", "cpu_s", "seconds_in_report")]
        cells = [name, tokens, windows, *("-" if x is None else f"{x:.1f}" for x in seconds), ratio,
                 _mib(job.get("vmhwm_mib")), floor]
        if capped:
            cells.append(f"{_mib(job.get('cgroup_peak_mib'))}, {job.get('oom_kills', '-')} (exit {job['returncode']})")
        return "| " + " | ".join(cells) + " |"

    lines.append(row("gates", result["gates"], "-", "-", "-", "-"))
    for t in result["train"]:
        floor = "-"
        if "layer_float32_mib" in t:
            total = start + t["layer_float32_mib"] + t["activations_mib"]
            floor = f"{total:.0f} ({start:.0f} + {t['layer_float32_mib']:.0f} + {t['activations_mib']:.0f})"
        ratio = f"{t['ratio_to_gates']:.2f}" if "ratio_to_gates" in t else "-"
        lines.append(row("train_routers", t, str(t["tokens_per_expert"]), str(t.get("windows", "-")), ratio, floor))
    return "\n".join(lines) + "\n"


def section(result: dict[str, Any]) -> str:
    """The README section: what was measured, how to rerun it, the numbers and the verdict."""
    d = result["dims"]
    note = f" {result['note']}" if result["note"] else ""
    cap = (f", under a {result['memory_cap_bytes'] / 2**30:g} GiB kernel memory cap"
           if result["memory_cap_bytes"] else ", no memory cap")
    lines = [
        "## Router training cost\n",
        f"Measured {result['date']} with `python benchmarks/train_cost.py --preset {result['preset']}` "
        f"({result['cores']} cores{cap}; one run each).{note}\n",
        f"Preset `{result['preset']}`: {d['experts']} experts of {d['layers']} layers, hidden {d['hidden']}, "
        f"intermediate {d['intermediate']}, vocab {d['vocab']} ({result['dense_params'] / 1e6:.0f}M parameters "
        f"each; the MoE's shards {result['shard_mib']:.0f} MiB), `gate_mode: hidden`, `router_training: layerwise` "
        "on the packaged domains' train splits. Each job runs alone in its own `snakemake` command after the "
        "weights were evicted from the page cache; wall and CPU seconds are the job's `benchmark:` file, VmHWM "
        "its process's peak resident memory, \"of which training\" the time the job's report gives its training "
        "(the rest is start-up, reading the texts and writing the reports). The floor is the design's: the start-up (imports, tokenizer) plus "
        "one MoE layer's float32 weights plus 16 bytes x tokens x hidden for the windows.\n",
        table(result),
    ]
    lines += [f"- {name}: the job failed (exit {job['returncode']}, {job.get('oom_kills', 0)} OOM kill(s) in the cgroup)"
              for name, job in [("gates", result["gates"]),
                                *((f"train_routers at {t['tokens_per_expert']} tokens per expert", t)
                                  for t in result["train"])] if job["returncode"] != 0]
    measured = [t for t in result["train"] if "ratio_to_gates" in t]
    if measured:
        worst = max(measured, key=lambda t: t["tokens_per_expert"])
        verdict = "met" if worst["ratio_to_gates"] <= TARGET else "missed"
        lines.append(f"- train / gates at {worst['tokens_per_expert']} tokens per expert: "
                     f"{worst['ratio_to_gates']:.2f} (target <= {TARGET:g}): {verdict}")
        if "vmhwm_mib" in worst and "layer_float32_mib" in worst:
            floor = result["start_up_rss_mib"] + worst["layer_float32_mib"] + worst["activations_mib"]
            lines.append(f"- peak memory at {worst['tokens_per_expert']} tokens per expert: {worst['vmhwm_mib']:.0f} MiB "
                         f"against the floor's {floor:.0f} MiB ({worst['vmhwm_mib'] - floor:+.0f} MiB)")
    ex = result["extrapolation"]
    if ex and not ex["measured"] and "wall_s" in result["gates"]:
        lines.append(f"- {ex['tokens_per_expert']} tokens per expert (the default) not measured; a line through the "
                     f"measured points ({ex['intercept_s']:.1f} s + {ex['s_per_1000_tokens']:.2f} s per 1000 tokens "
                     f"per expert) gives {ex['wall_s']:.0f} s, {ex['wall_s'] / result['gates']['wall_s']:.1f}x the "
                     "gates job (extrapolated)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096], metavar="N",
                        help="tokens_per_expert values, one training job each (the schema's minimum is 256)")
    parser.add_argument("--memory-cap", type=parse_size, default=None, metavar="SIZE",
                        help="run the measured jobs in a kernel memory cgroup of this size (e.g. 6G; needs root)")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds allowed for one snakemake command")
    parser.add_argument("--data-dir", type=Path, default=BENCH_DIR / ".data",
                        help="input models (cached, shared with build_speed.py) and the runs")
    parser.add_argument("--note", default="", help="a sentence on the machine's state, into the README section")
    args = parser.parse_args(argv)
    args.tokens = sorted(set(args.tokens))
    if min(args.tokens) < 256:
        raise SystemExit(f"--tokens: {min(args.tokens)} is below the recipe schema's minimum tokens_per_expert, 256")
    result = {"date": datetime.date.today().isoformat(), "cores": args.cores, "cpu_count": os.cpu_count(),
              "note": args.note, "memory_cap_bytes": args.memory_cap, "target": TARGET,
              "machine": machine_info(None), **measure(args)}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_readme_section(README, BEGIN, END, section(result))
    print(section(result))


if __name__ == "__main__":
    main()
