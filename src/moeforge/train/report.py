"""What router training did, for people: report.json, report.md and a figure.

The figure shows the loss per step (one line per layer for ``layerwise``, one line for ``end_to_end``)
beside the held-out routing accuracy per layer and expert after training, each cell with its value
before training (the gates' rows) in brackets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib import style
from matplotlib.figure import Figure

from moeforge.io.files import atomic_path, write_json, write_text
from moeforge.numbers import fmt


def render_markdown(report: dict[str, Any]) -> str:
    """Settings, texts, then held-out routing accuracy per layer and expert, before -> after."""
    settings = report["settings"]
    lines = [f"# Router training: {report['merge']}", "",
             f"Method `{settings['method']}`, {settings['steps']} steps at learning rate {settings['learning_rate']}, "
             f"seed {settings['seed']}, on {settings['device']}: {fmt(report['seconds'], '.1f')} s, peak memory "
             f"{fmt(report['peak_rss_mib'], '.0f')} MiB.", "",
             "## Texts", "", "| expert | text | tokens | sha256 |", "|---|---|---:|---|"]
    lines += [f"| {t['expert']} | {t['path']} | {t['tokens']} | `{t['sha256'][:16]}` |" for t in report["texts"]]
    experts = report["experts"]
    lines += ["", f"## Held-out routing accuracy (top-1, {report['heldout_tokens']} tokens), before -> after", "",
              "| layer | all | " + " | ".join(experts) + " |", "|---|" + "---:|" * (len(experts) + 1)]
    for row in report["layers"]:
        before, after = row["heldout_before"], row["heldout_after"]
        cells = [f"{fmt(b, '.2f')} -> {fmt(a, '.2f')}" for b, a in zip(before["per_expert"], after["per_expert"],
                                                                          strict=True)]
        lines.append(f"| {row['layer']} | {fmt(before['all'], '.2f')} -> {fmt(after['all'], '.2f')} | "
                     + " | ".join(cells) + " |")
    shared = [row for row in report["layers"] if "shared_gate" in row]
    if shared:
        lines += ["", "Shared expert gate, held-out accuracy: " + ", ".join(
            f"layer {row['layer']} {row['shared_gate']['heldout_before']:.2f} -> {row['shared_gate']['heldout_after']:.2f}"
            for row in shared)]
    return "\n".join(lines) + "\n"


def plot_training(report: dict[str, Any], out_png: Path) -> None:
    """Loss per step beside held-out accuracy per layer and expert (after training; before in brackets)."""
    with style.context("default"):
        experts, layers = report["experts"], report["layers"]
        fig = Figure(figsize=(5.5 + 1.0 * len(experts), 1.8 + 0.35 * max(len(layers), 4)), layout="constrained")
        loss_ax, acc_ax = fig.subplots(1, 2, width_ratios=[1.3, 0.4 + 0.3 * len(experts)])
        for curve in report["loss_curves"]:
            loss_ax.plot(range(1, len(curve["losses"]) + 1), curve["losses"], label=curve["label"], linewidth=1)
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("training loss")
        if len(report["loss_curves"]) <= 12:
            loss_ax.legend(fontsize=7)
        after = [[v if v is not None else float("nan") for v in row["heldout_after"]["per_expert"]] for row in layers]
        acc_ax.imshow(after, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        for r, row in enumerate(layers):
            for c, (b, a) in enumerate(zip(row["heldout_before"]["per_expert"], row["heldout_after"]["per_expert"],
                                           strict=True)):
                acc_ax.text(c, r, f"{fmt(a, '.2f')}\n({fmt(b, '.2f')})", ha="center", va="center", fontsize=6,
                            color="white" if (a or 0) < 0.6 else "black")
        acc_ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right")
        acc_ax.set_yticks(range(len(layers)), [str(row["layer"]) for row in layers])
        acc_ax.set_xlabel("expert")
        acc_ax.set_ylabel("layer")
        acc_ax.set_title("held-out routing accuracy\n(before training)", fontsize=8)
        fig.suptitle(f"{report['merge']}: router training ({report['settings']['method']})", fontsize=9)
        with atomic_path(Path(out_png)) as tmp:
            fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def write_reports(report: dict[str, Any], out_json: Path, out_md: Path, out_png: Path) -> None:
    """The three outputs, each written atomically."""
    write_json(out_json, report)
    write_text(out_md, render_markdown(report))
    plot_training(report, out_png)
