"""What a run leaves behind, said at its end: per merge, where the model and reports are, one line per check.

The reports are read as they stand on disk when the run ends (a check that did not run this time but ran
before is shown as it was), so the summary is the same whether a step was built now or earlier. A report
that is missing says so; nothing here raises, since the summary must never turn a finished run into a
failed one. The same verdicts, with their numbers, label the figures of `snakemake --report`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _smoke(report: dict[str, Any]) -> str:
    if report.get("passed"):
        return "passed (strict load, generation, comparison with the base)"
    errors = report.get("errors") or ["see the report"]
    return f"FAILED: {errors[0]}"


def _eval(report: dict[str, Any]) -> str:
    oracle = report.get("oracle") or {}
    ratios = {d: v.get("moe_ratio") for d, v in oracle.items() if isinstance(v, dict)}
    ratios = {d: r for d, r in ratios.items() if isinstance(r, (int, float))}
    if not ratios:
        return "no domain scored"
    worst = max(ratios, key=ratios.__getitem__)
    return (f"worst domain {worst}: MoE perplexity {ratios[worst]:.3f}x the best dense expert's "
            f"({len(ratios)} domain(s))")


def _gguf(report: dict[str, Any]) -> str:
    status = report.get("status") or ("pass" if report.get("passed") else "fail")
    return {"pass": "passed (llama.cpp matches transformers)", "fail": "FAILED: see the report",
            "unsupported": "not supported for this architecture"}.get(status, str(status))


def _routers(report: dict[str, Any]) -> str:
    layers = report.get("layers") or []
    if not layers:
        return "no layer trained"
    before = min(row["heldout_before"]["all"] for row in layers)
    after = min(row["heldout_after"]["all"] for row in layers)
    return (f"trained ({report['settings']['method']}): held-out routing accuracy {before:.2f} -> {after:.2f} "
            f"(worst layer, {len(layers)} layer(s))")


def _reproduce(report: dict[str, Any]) -> str:
    return str(report.get("verdict", "no verdict"))


#: (label, report under results/<merge>/, how its verdict reads)
CHECKS: tuple[tuple[str, str, Callable[[dict[str, Any]], str]], ...] = (
    ("smoke test", "smoke/report.json", _smoke),
    ("routers", "routers/report.json", _routers),
    ("evaluation", "eval/report.json", _eval),
    ("gguf", "gguf/report.json", _gguf),
    ("reproduce", "reproduce/report.json", _reproduce),
)


def smoke_label(path: Path) -> str:
    """The smoke test's verdict with its numbers (how far the merge is from its base), as its figures' label in
    `snakemake --report`: the report is read when the page is made, after the run, so the label is this run's."""
    report = _read(path)
    if report is None:
        return "no report"
    verdict = "passed" if report.get("passed") else f"FAILED: {(report.get('errors') or ['see the report'])[0]}"
    comparison = report.get("comparison") or {}
    numbers = [f"mean KL(base || merged) {comparison['kl_mean']:.3g} nats",
               f"top-1 agreement with the base {comparison['top1_agreement']:.0%}"] if comparison else []
    return "; ".join([verdict, *numbers, f"{len(report.get('warnings') or [])} warning(s)"])


def eval_label(path: Path) -> str:
    """The evaluation's verdict (the worst domain against its best dense expert), as its figure's label."""
    report = _read(path)
    return "no report" if report is None else _eval(report)


def merge_summary(merge: str, results: Path = Path("results")) -> list[str]:
    """The lines for one merge: the model's place, then each check that has a report."""
    root = results / merge
    model = root / "model"
    lines = [f"{merge}:"]
    if (model / "moeforge.lock.json").is_file():
        lines.append(f"  model       {model}/")
    else:
        lines.append("  model       not built (or not published: it did not pass its checks)")
    for label, name, verdict in CHECKS:
        report = _read(root / name)
        if report is not None:
            lines.append(f"  {label:<11} {verdict(report)}  [{(root / name).with_suffix('.md')}]")
    return lines


def search_summary(search: str, record: Mapping[str, Any], results: Path = Path("results")) -> str:
    """One line for a search: its best candidate by its metric, and where the ranking is. ``record`` is the search
    as configured now (its metric, each candidate's name): a ranking of an earlier grid or metric, or one older
    than a candidate's eval report (a run stopped before it ranked them again), is no ranking of this search."""
    path = results / "search" / search / "ranking.json"
    ranking = _read(path)
    if ranking is None or not ranking.get("candidates"):
        return f"search {search}: not ranked (its candidates are not all evaluated)"
    if not _ranks(ranking, record, path, results):
        return (f"search {search}: not ranked as configured ({path.with_suffix('.md')} ranks an earlier grid, metric "
                "or build of its candidates; snakemake search ranks them again)")
    best = ranking["candidates"][0]
    metric = (ranking.get("metric") or {}).get("name", "metric")
    return (f"search {search}: best {best.get('merge')} ({metric} {best.get('metric')}) of "
            f"{len(ranking['candidates'])} candidates  [{path.with_suffix('.md')}]")


def _ranks(ranking: dict[str, Any], record: Mapping[str, Any], path: Path, results: Path) -> bool:
    """Whether the ranking on disk ranks the configured candidates by the configured metric, after every one of
    them was last evaluated."""
    ranked = sorted(str(row.get("merge")) for row in ranking["candidates"] if isinstance(row, dict))
    wanted = sorted(candidate["merge"] for candidate in record["candidates"])
    if ranked != wanted or (ranking.get("metric") or {}).get("name") != record["metric"]:
        return False
    written = path.stat().st_mtime
    reports = [results / merge / "eval" / "report.json" for merge in wanted]
    return all(report.is_file() and report.stat().st_mtime <= written for report in reports)


def run_summary(merges: Sequence[str], results: Path = Path("results"),
                searches: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The whole summary, one block per merge, then one line per search (name -> the search as configured)."""
    blocks = ["\n".join(merge_summary(m, results)) for m in merges] + [
        search_summary(name, record, results) for name, record in (searches or {}).items()]
    return "moeforge summary (paths relative to the working directory):\n" + "\n".join(blocks)
