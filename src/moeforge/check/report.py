"""The smoke report as files: sorted JSON and a readable markdown page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeforge.io.files import write_text
from moeforge.numbers import fmt


def write_report(report: dict[str, Any], out_json: Path, out_md: Path) -> None:
    """Write the report as sorted JSON and as markdown; each file appears complete or not at all."""
    write_text(Path(out_json), json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    write_text(Path(out_md), render_markdown(report))


def render_markdown(report: dict[str, Any]) -> str:
    """A readable report: verdict and warnings first, then generations, comparison, routing."""
    status = "FAIL" if not report.get("passed", False) else (
        f"PASS with {len(report['warnings'])} warning(s)" if report["warnings"] else "PASS")
    lock = report.get("lock")  # a verify report: the lock check came first
    lines = [f"# Verify {report['model_dir']}: {status}" if lock else f"# Smoke test: {status}", ""]
    lines += _md_list("Errors", report.get("errors", [])) + _md_list("Warnings", report["warnings"])
    if lock:
        lines += _md_lock(lock)
    lines += _md_model(report) + _md_generations(report["generations"], report["memory"])
    if report["comparison"] is not None:
        lines += _md_comparison(report["comparison"])
    if report["routing"] is not None:
        lines += _md_routing(report["routing"])
    return "\n".join(lines).rstrip("\n") + "\n"


def _md_lock(lock: dict[str, Any]) -> list[str]:
    """What verify checked against the model's lock before its smoke test."""
    lines = ["## Lock check", "", f"- model files: all {lock['files_verified']} match the sha256 the lock records"]
    if "source_files_verified" in lock:
        lines.append(f"- source files: {lock['source_files_verified']} on this machine match the lock; "
                     f"{lock['source_files_not_here']} not on this machine (not checked)")
    return lines + ["- smoke test: the model alone (a downloaded merge has no base at hand to compare with)", ""]


def _md_list(title: str, items: list[str]) -> list[str]:
    return [f"## {title}", "", *[f"- {item}" for item in items], ""] if items else []


def _md_model(report: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in sorted(report["versions"].items()))
    load = report["load"]
    base = f"`{report['base_dir']}`" if report["base_dir"] else "not compared"
    lines = ["## Model", "", f"- model: `{report['model_dir']}`", f"- base: {base}",
             f"- versions: {versions}",
             f"- loaded strictly: {load['parameters']} parameters, {load['tensors_scanned']} tensors "
             f"in {len(load['files'])} file(s), all finite (scanned by {load.get('scanned_by', 'this check')})",
             _md_memory(report["memory"]),
             "", "| config key | value |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v, sort_keys=True)}` |" for k, v in sorted(report["config"].items())]
    return lines + [""]


def _md_memory(memory: dict[str, Any]) -> str:
    """The memory budget the check ran under, and whether generation fitted it."""
    budget = "unknown" if memory["budget_gib"] is None else f"{fmt(memory['budget_gib'], '.2f')} GiB"
    kept = memory["resident_layers"]
    streamed = (f"ran with {kept} decoder layer(s) kept loaded and the others one at a time" if kept else
                f"ran one decoder layer at a time (about {fmt(memory['streamed_generation_gib'], '.2f')} GiB)")
    generation = {"whole": "ran on the whole model", "streamed": streamed, None: "was skipped"}[memory["generation"]]
    return (f"- memory: budget {budget} ({memory['budget_source']}); comparison and routing ran one layer at a "
            f"time; greedy generation (about {fmt(memory['whole_model_gib'], '.2f')} GiB with the whole model loaded) "
            f"{generation}")


def _fence(text: str) -> list[str]:
    """A code block that the text itself cannot close, with control characters made visible.

    Broken models often emit control bytes; escaped, they can neither garble a terminal nor
    hide as blank output.
    """
    text = "".join(ch if ch.isprintable() or ch in "\n\t" else ascii(ch)[1:-1] for ch in text)
    ticks = "`" * max(3, _longest_backtick_run(text) + 1)
    return [ticks + "text", text, ticks]


def _longest_backtick_run(text: str) -> int:
    """Length of the longest run of backticks in ``text``."""
    best = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best


def _md_generations(rows: list[dict[str, Any]] | None, memory: dict[str, Any]) -> list[str]:
    lines = ["## Generations (greedy)", ""]
    if rows is None:
        return lines + [memory["generation_note"], ""]
    if memory["generation"] == "streamed":
        lines += [memory["generation_note"], ""]
    for i, row in enumerate(rows):
        flags = ", ".join(row["flags"]) or "none"
        lines += [f"### Prompt {i}", "", *_fence(row["prompt"]), "",
                  f"Merged model ({row['new_tokens']} new tokens, {row['distinct_tokens']} distinct; "
                  f"degeneracy flags: {flags}):", "", *_fence(row["text"]), ""]
        if "base_text" in row:
            tie = row.get("near_tie")
            same = ("identical to the merged model" if row["matches_base"] else
                    f"parts from the merged model at new token {tie['step']}, where the {tie['model']} model's two "
                    f"best logits were a near tie ({fmt(tie['logits'][0], '.6g')} vs {fmt(tie['logits'][1], '.6g')}): "
                    "within numerical noise, not a difference of the merge" if tie else "differs")
            lines += [f"Base model ({same}; flags: {', '.join(row['base_flags']) or 'none'}):", "",
                      *_fence(row["base_text"]), ""]
    return lines


def _md_comparison(comparison: dict[str, Any]) -> list[str]:
    lines = ["## Comparison with the base", "",
             f"Mean KL(base || merged) {fmt(comparison['kl_mean'], '.4g')} nats, top-1 agreement "
             f"{fmt(comparison['top1_agreement'], '.2%')}, max |Δlogit| {fmt(comparison['max_abs_logit_diff'], '.4g')}.",
             "", "| prompt | positions | mean KL | max KL | top-1 agreement | max abs Δlogit |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {p['positions']} | {fmt(p['kl_mean'], '.4g')} | {fmt(p['kl_max'], '.4g')} | "
              f"{fmt(p['top1_agreement'], '.2%')} | {fmt(p['max_abs_logit_diff'], '.4g')} |"
              for i, p in enumerate(comparison["prompts"])]
    return lines + [""]


def _md_routing(routing: dict[str, Any]) -> list[str]:
    names = routing["experts"]
    lines = ["## Routing", "",
             f"Share of the top-{routing['top_k']} slots per expert over {routing['tokens']} prompt "
             f"tokens ({routing['texts']} texts); uniform is {1 / len(names):.1%}, dead below "
             f"{fmt(routing['dead_share_threshold'], '.2%')}. Entropies in nats (max {fmt(routing['max_entropy'], '.3g')}).",
             "", "| layer | " + " | ".join(names) + " | router entropy | load entropy |",
             "|---" * (len(names) + 3) + "|"]
    lines += [f"| {row['layer']} | " + " | ".join(f"{fmt(s, '.1%')}" for s in row["load_share"])
              + f" | {fmt(row['router_entropy_mean'], '.3g')} | {fmt(row['load_entropy'], '.3g')} |"
              for row in routing["layers"]]
    own = [n for n in names if n in routing["layers"][0]["own_top1"]] if routing["layers"] else []
    if own:
        lines += ["", "Fraction of each expert's own prompt tokens routed to it as top-1:", "",
                  "| layer | " + " | ".join(own) + " |", "|---" * (len(own) + 1) + "|"]
        lines += [f"| {row['layer']} | " + " | ".join(f"{fmt(row['own_top1'][n], '.1%')}" for n in own) + " |"
                  for row in routing["layers"]]
    return lines + [""]
