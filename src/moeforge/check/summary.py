"""What a run leaves behind, said at its end: per merge, where the model and reports are, one line per check.

The reports are read as they stand on disk when the run ends (a check that did not run this time but ran
before is shown as it was), so the summary is the same whether a step was built now or earlier. A report
that is missing says so; nothing here raises, since the summary must never turn a finished run into a
failed one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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


def run_summary(merges: Sequence[str], results: Path = Path("results")) -> str:
    """The whole summary, one block per merge."""
    blocks = ["\n".join(merge_summary(m, results)) for m in merges]
    return "moeforge summary (paths relative to the working directory):\n" + "\n".join(blocks)
