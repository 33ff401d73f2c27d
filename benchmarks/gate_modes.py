"""Which gate mode routes best, and what router training adds? The demo recipe built every way, per domain.

For each gate mode the demo recipe (three tiny experts fine-tuned on code, arithmetic and cooking
texts) is built by the real workflow (``snakemake eval``) without router training, and the best prompt
mode's routers trained by the workflow's own stage (``router_training``: ``layerwise`` and
``end_to_end``); each MoE's held-out perplexity is divided by the oracle's (on each domain, the best
dense expert): 1.0 means the routers lose nothing. mergekit-moe's routers for the same recipe are
evaluated the same way for comparison. The prompt-based and trained routers are also evaluated on the
same domains written in another style (``benchmarks/restyled/``: code in another idiom, arithmetic
as question and working, recipes in prose), where trained routers must not do worse.

    python benchmarks/gate_modes.py                    # writes the table into benchmarks/README.md
    python benchmarks/gate_modes.py --no-peer          # without mergekit-moe

Results: ``benchmarks/results/gate_modes.json`` and the README section between the gate-modes markers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from readme_section import write_readme_section

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "config" / "recipes" / "demo.yaml"
README = REPO / "benchmarks" / "README.md"
RESULTS = REPO / "benchmarks" / "results" / "gate_modes.json"
BEGIN, END = "<!-- gate-modes:begin -->", "<!-- gate-modes:end -->"
PEER = REPO / ".venv-mergekit" / "bin" / "mergekit-moe"
#: The best prompt mode: the starting point of the trained routers.
TRAINED_FROM = {"gate_mode": "router_input", "token_reduction": "mean"}
#: merge name -> recipe changes; every other key is the demo recipe's (its router training only where named).
MODES: dict[str, dict[str, Any]] = {
    "hidden": {"gate_mode": "hidden"},
    "hidden_avg": {"gate_mode": "hidden_avg"},
    "cheap_embed": {"gate_mode": "cheap_embed"},
    "router_input-last": {"gate_mode": "router_input", "token_reduction": "last"},
    "router_input-mean": TRAINED_FROM,
    "random": {"gate_mode": "random"},
    "trained-layerwise": {**TRAINED_FROM, "router_training": {"method": "layerwise"}},
    "trained-end_to_end": {**TRAINED_FROM, "router_training": {"method": "end_to_end"}},
}
#: The modes mergekit-moe has, built by it from the same recipe.
PEER_MODES = ("hidden", "hidden_avg", "cheap_embed")
#: The routers compared on the restyled texts: the best prompt mode and its trained versions.
RESTYLED_MODES = ("router_input-mean", "trained-layerwise", "trained-end_to_end")
RESTYLED = REPO / "benchmarks" / "restyled"


def recipe_for(changes: dict[str, Any]) -> dict[str, Any]:
    """The demo recipe with one gate mode's settings (token_reduction only where it applies)."""
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe.pop("token_reduction", None)
    if "router_training" not in changes:
        recipe.pop("router_training", None)
        for expert in recipe["experts"]:
            expert.pop("train_texts", None)
    return {**recipe, **changes}


def build_all(work: Path, cores: int) -> None:
    """Build and evaluate every mode's merge with the real workflow, in one Snakemake run."""
    shutil.copytree(REPO / "config", work / "config", dirs_exist_ok=True)
    merges = {}
    for name, changes in MODES.items():
        path = work / "recipes" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe_for(changes), sort_keys=False))
        merges[name] = {"recipe": str(path.relative_to(work))}
    (work / "modes.yaml").write_text(yaml.safe_dump({"merges": merges}))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores",
               str(cores), "eval", "--configfile", str(work / "modes.yaml")]
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL)


def evaluate_dir(work: Path, model_dir: Path, domains: dict[str, Path] | None = None) -> dict[str, Any]:
    """The evaluation report of a model directory against the demo's models, on the held-out texts or others."""
    from moeforge.check.evaluate import EvalOptions, evaluate
    from moeforge.demo.tiny_models import DEMO_EXPERTS
    from moeforge.io.domains import heldout_paths

    demo = work / "resources" / "demo"
    return evaluate(model_dir, demo / "base", {name: demo / name for name in DEMO_EXPERTS},
                    domains or heldout_paths(), EvalOptions())


def peer_merge(work: Path, peer: Path, mode: str) -> Path:
    """mergekit-moe's build of the demo recipe under ``mode`` (run from the work dir: relative model paths)."""
    recipe = work / "recipes" / f"mergekit-{mode}.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for({"gate_mode": mode}), sort_keys=False))
    out = work / "mergekit" / mode
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([str(peer), str(recipe), str(out), "--device", "cpu", "--quiet",
                    "--i-understand-this-is-not-useful-without-training"],
                   check=True, cwd=work, stdin=subprocess.DEVNULL)
    return out


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per router source, the MoE / oracle perplexity ratio per domain and the worst."""
    domains = list(next(iter(rows.values()))["oracle"])
    lines = ["| routers | " + " | ".join(domains) + " | worst |", "|---|" + "---:|" * (len(domains) + 1)]
    for name, report in sorted(rows.items(), key=lambda item: _worst(item[1])):
        ratios = [report["oracle"][d]["moe_ratio"] for d in domains]
        lines.append(f"| {name} | " + " | ".join(f"{r:.3f}" for r in ratios) + f" | {max(ratios):.3f} |")
    first = next(iter(rows.values()))
    oracle = ", ".join(f"{d} {first['oracle'][d]['perplexity']:.3f} ({first['oracle'][d]['expert']})"
                       for d in domains)
    base = ", ".join(f"{d} {first['perplexity']['base'][d]:.3f}" for d in domains)
    return "\n".join(lines) + f"\n\nOracle perplexity: {oracle}. Base: {base}.\n"


def section(rows: dict[str, dict[str, Any]], restyled: dict[str, dict[str, Any]]) -> str:
    """The README section: what was measured, how to rerun it, the tables."""
    return (
        "## Gate modes compared\n\n"
        "`python benchmarks/gate_modes.py` builds the demo recipe (`config/recipes/demo.yaml`: three tiny experts, "
        "each the demo base with its MLP fine-tuned on one domain) under every gate mode with the real workflow "
        "(`snakemake eval`), mergekit-moe 0.1.5's routers for the same recipe (`.venv-mergekit`), and the "
        "`router_input-mean` MoE with its routers trained by the workflow's `router_training` stage on the "
        "domains' train splits (`trained-layerwise`, `trained-end_to_end`, default settings). Each cell is the "
        "MoE's held-out perplexity divided by the oracle's (on that domain, the best dense expert): 1.000 means "
        "the routers lose nothing. Sorted by the worst domain.\n\n" + table(rows) +
        "\nThe same domains written in another style (`benchmarks/restyled/`: code in another idiom, arithmetic "
        "as question and working, recipes in prose), MoE / oracle as above:\n\n" + table(restyled)
    )


def _worst(report: dict[str, Any]) -> float:
    return max(entry["moe_ratio"] for entry in report["oracle"].values())



def portable(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The results without this machine's paths: domain texts named relative to the repository."""
    for report in rows.values():
        for domain in report["domains"].values():
            text = Path(domain["text"])
            domain["text"] = str(text.relative_to(REPO)) if text.is_relative_to(REPO) else text.name
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / ".data" / "gate_modes")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="skip mergekit-moe")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    build_all(args.work, args.cores)
    rows = {f"moeforge {name}": json.loads((args.work / f"results/{name}/eval/report.json").read_text())
            for name in MODES}
    if not args.no_peer:
        for mode in PEER_MODES:
            rows[f"mergekit-moe {mode}"] = evaluate_dir(args.work, peer_merge(args.work, PEER, mode))
    restyled_texts = {path.stem: path for path in sorted(RESTYLED.glob("*.txt"))}
    restyled = {f"moeforge {name}": evaluate_dir(args.work, args.work / f"results/{name}/model", restyled_texts)
                for name in RESTYLED_MODES}
    RESULTS.write_text(json.dumps({"heldout": portable(rows), "restyled": portable(restyled)}, indent=2,
                                  sort_keys=True) + "\n")
    write_readme_section(README, BEGIN, END, section(rows, restyled))
    print(table(rows))
    print(table(restyled))
    print(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
