"""A search's candidates ranked by their evaluation: ranking.json, ranking.md and a figure.

The ranking reads only the candidates' eval reports (and their smoke tests' verdicts), so it is
as cheap to redo with another metric as it is to read them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from moeforge.build.markdown import cell, code
from moeforge.errors import BuildError
from moeforge.io.files import read_json, write_json, write_text
from moeforge.numbers import fmt, report_number
from moeforge.search.figure import plot_ranking
from moeforge.search.metrics import METRICS

_FIX = "rerun the candidate's eval target (snakemake search reruns what is missing)"


def rank(record: Mapping[str, Any], reports: Mapping[str, Mapping[str, Any]],
         smoke: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ranking document: candidates best first (ties by name), each with its settings and numbers."""
    metric = METRICS[record["metric"]]
    rows = []
    for candidate in record["candidates"]:
        merge = candidate["merge"]
        report = reports[merge]
        value = metric.read(report)
        rows.append({
            "rank": 0,
            "merge": merge,
            "settings": candidate["settings"],
            "metric": report_number(value),
            "moe_ratio": {d: entry["moe_ratio"] for d, entry in report["oracle"].items()},
            "moe_perplexity": dict(report["perplexity"]["moe"]),
            "smoke_passed": smoke[merge].get("passed"),
            "model": f"results/{merge}/model",
            "eval_report": f"results/{merge}/eval/report.json",
        })
    rows.sort(key=lambda row: (math.inf if row["metric"] is None else row["metric"], row["merge"]))
    for place, row in enumerate(rows, start=1):
        row["rank"] = place
    return {"search": record["search"], "start": record["start"], "grid": record["grid"],
            "metric": {"name": metric.name, "description": metric.description, "better": "lower"},
            "best": rows[0]["merge"], "candidates": rows}


def render_markdown(ranking: Mapping[str, Any]) -> str:
    """A table, best first: each grid key's value, the metric and each domain's MoE / oracle perplexity."""
    keys = list(ranking["grid"])
    domains = list(ranking["candidates"][0]["moe_ratio"])
    metric = ranking["metric"]
    start = ", ".join(f"{k}: {code(str(v))}" for k, v in ranking["start"].items())
    lines = [f"# Search {ranking['search']}", "",
             f"{len(ranking['candidates'])} candidates from {start}, ranked by `{metric['name']}`: "
             f"{metric['description']} (lower is better). Best: **{ranking['best']}**.", "",
             "| rank | candidate | " + " | ".join(keys) + f" | {metric['name']} | "
             + " | ".join(f"moe/oracle {d}" for d in domains) + " |",
             "|---|---|" + "---|" * (len(keys) + 1 + len(domains))]
    for row in ranking["candidates"]:
        lines.append(f"| {row['rank']} | {row['merge']} | "
                     + " | ".join(cell(_shown(row["settings"][k])) for k in keys)
                     + f" | **{fmt(row['metric'], '.4f')}** | "
                     + " | ".join(fmt(row["moe_ratio"][d], ".3f") for d in domains) + " |")
    lines += ["", "Each candidate's model is `results/<candidate>/model/`, its evaluation "
              "`results/<candidate>/eval/report.md`."]
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    """A grid value as text; the table cell escapes it (a prompt may hold ``|``, backticks and line breaks)."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def rank_stage(record: Mapping[str, Any], eval_reports: list[Path], smoke_reports: list[Path], out_json: Path,
               out_md: Path, out_png: Path) -> dict[str, Any]:
    """The ranking rule: reports given in the record's candidate order."""
    merges = [c["merge"] for c in record["candidates"]]
    if len(eval_reports) != len(merges) or len(smoke_reports) != len(merges):
        raise BuildError(f"{len(eval_reports)} eval and {len(smoke_reports)} smoke reports for {len(merges)} "
                         "candidates", f"search {record['search']}", "the rule's inputs and the search disagree")
    reports = {m: read_json(p, "", BuildError, _FIX) for m, p in zip(merges, eval_reports)}
    smoke = {m: read_json(p, "", BuildError, _FIX) for m, p in zip(merges, smoke_reports)}
    ranking = rank(record, reports, smoke)
    write_json(out_json, ranking)
    write_text(out_md, render_markdown(ranking))
    plot_ranking(ranking, out_png)
    return ranking
