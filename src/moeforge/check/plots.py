"""Figures for the reports: expert load and gate similarity per layer (smoke test), perplexity and routing
per domain (evaluation).

Figures are drawn on matplotlib's Agg canvas without pyplot, so importing this module changes no
global backend, and under matplotlib's default style, so a user's matplotlibrc cannot change
them. PNGs are written without the Software metadata entry, so a rerun gives identical bytes.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, style
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from moeforge.errors import BuildError
from moeforge.io.files import atomic_path

_ANNOTATE_MAX_CELLS = 256
#: Perplexities within this ratio of each other on every domain make a flat chart, and the title says why.
FLAT_SPREAD = 1.02
_MAX_PANELS_PER_ROW = 8


def plot_expert_load(report: dict[str, Any], out_png: Path) -> None:
    """Heatmap of the share of top-k slots per layer (rows) and expert (columns).

    Dead or overloaded experts stand out as dark or bright cells. A model without routing
    statistics gets a figure saying so, so the rule's output always exists.
    """
    with style.context("default"):
        routing = report.get("routing")
        if not routing or not routing["layers"]:
            fig = Figure(figsize=(4, 1.5))
            fig.text(0.5, 0.5, "no routing statistics", ha="center", va="center")
            save_png(fig, Path(out_png))
            return
        names = routing["experts"]
        layers = [row["layer"] for row in routing["layers"]]
        share = [row["load_share"] for row in routing["layers"]]
        fig = Figure(figsize=(1.6 + 0.7 * len(names), 1.2 + 0.35 * len(layers)), layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(share, cmap="viridis", vmin=0.0, vmax=max(map(max, share)) or 1.0,
                          aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        merge = (report.get("build") or {}).get("merge", "")
        verdict = "smoke test passed" if report.get("passed") else "smoke test FAILED"
        ax.set_title(textwrap.fill(f"{merge}: {verdict}; share of top-{routing['top_k']} slots per layer "
                                   f"(uniform {1 / len(names):.2f})", max(30, int(13 * (1.6 + 0.7 * len(names))))),
                     fontsize=9)
        if len(names) * len(layers) <= _ANNOTATE_MAX_CELLS:
            for r, row in enumerate(share):
                for c, value in enumerate(row):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.5 * image.norm.vmax else "black")
        fig.colorbar(image, ax=ax, label="share")
        save_png(fig, Path(out_png))


def plot_gate_similarity(gates_json: dict[str, Any], out_png: Path) -> None:
    """Cosine similarity between expert router rows, one small tile per layer.

    Rows that are nearly parallel mean the router cannot tell those experts apart, which is the
    usual cause of one expert taking all the traffic. The tiles are laid out in one image on one
    axes: a panel per layer (30-80 of them in real models) made layout and drawing the slow part.
    """
    layers = _gate_layers(gates_json)
    experts = len(layers[0]["cosine"])
    cols = min(_MAX_PANELS_PER_ROW, math.ceil(math.sqrt(len(layers))))
    rows = math.ceil(len(layers) / cols)
    step = experts + 1  # one blank cell between tiles
    mosaic = np.full((rows * step, cols * step), np.nan)
    for n, layer in enumerate(layers):
        top, left = (n // cols) * step + 1, (n % cols) * step
        mosaic[top:top + experts, left:left + experts] = layer["cosine"]
    with style.context("default"):
        tile = min(2.4, max(0.9, 0.3 * experts))
        fig = Figure(figsize=(tile * cols + 1.6, tile * rows + 0.9), layout="constrained")
        ax = fig.add_subplot()
        cmap = colormaps["coolwarm"].with_extremes(bad="white")
        image = ax.imshow(mosaic, cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
        for n, layer in enumerate(layers):
            ax.text((n % cols) * step + (experts - 1) / 2, (n // cols) * step + 0.3, f"layer {layer['layer']}",
                    ha="center", va="center", fontsize=7)
        ax.set_axis_off()
        names = gates_json.get("experts") or []
        # Wrapped to the figure's width (about 13 characters an inch at 8 points): a narrow figure of few
        # layers clipped a one-line title.
        width = max(24, int(13 * (tile * cols + 1.6)))
        title = textwrap.fill("gate cosine similarity (each tile: experts x experts, in router order)", width)
        legend = textwrap.fill(", ".join(f"{i}: {name}" for i, name in enumerate(names)), width)
        fig.suptitle(title + (f"\n{legend}" if legend else ""), fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8, label="cosine")
        save_png(fig, Path(out_png))


def _gate_layers(gates_json: dict[str, Any]) -> list[dict[str, Any]]:
    """The layers of a gates.json dict, checked to be ``{"layers": [{"layer", "cosine"}, ...]}``."""
    layers = gates_json.get("layers") if isinstance(gates_json, dict) else None
    if not isinstance(layers, list) or not layers:
        raise BuildError("expected a non-empty list under 'layers'", "gates.json",
                         "rerun the gates step")
    for entry in layers:
        matrix = entry.get("cosine") if isinstance(entry, dict) else None
        ok = (isinstance(entry, dict) and isinstance(entry.get("layer"), int)
              and isinstance(matrix, list) and matrix
              and all(isinstance(row, list) and len(row) == len(matrix)
                      and all(isinstance(x, (int, float)) for x in row) for row in matrix))
        if not ok:
            raise BuildError(f"layer entry {entry!r:.80} is not {{'layer': int, 'cosine': E x E}}",
                             "gates.json", "rerun the gates step")
    sizes = sorted({len(entry["cosine"]) for entry in layers})
    if len(sizes) > 1:
        raise BuildError(f"the layers' cosine matrices differ in size ({sizes} experts)", "gates.json",
                         "rerun the gates step")
    return layers


def save_png(fig: Figure, path: Path) -> None:
    """Write the PNG atomically, without the Software tag (so the bytes are stable)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def plot_evaluation(report: dict[str, Any], out_png: Path) -> None:
    """Perplexity per domain for every model (bars), beside the share of each domain's tokens per expert.

    The bars show at a glance whether the MoE reaches the oracle (the best expert) on each domain;
    the heatmap shows why: which expert each domain's tokens go to.
    """
    domains = list(report["domains"])
    bars = {model: [report["perplexity"][model][d] or math.nan for d in domains] for model in report["perplexity"]}
    # The oracle (each domain's best dense expert) is the bar the MoE should reach.
    bars["oracle (best expert)"] = [report["oracle"][d]["perplexity"] or math.nan for d in domains]
    routed = all(report["routing"].values())
    with style.context("default"):
        fig = Figure(figsize=(4 + 1.2 * len(domains) + (3 if routed else 0), 3.8), layout="constrained")
        axes = fig.subplots(1, 2 if routed else 1, squeeze=False, width_ratios=[2, 1] if routed else None)[0]
        width = 0.8 / len(bars)
        for m, (model, values) in enumerate(bars.items()):
            oracle = m == len(bars) - 1
            axes[0].bar([i + (m - (len(bars) - 1) / 2) * width for i in range(len(domains))], values, width,
                        label=model, **({"color": "white", "edgecolor": "black", "hatch": "//"} if oracle else {}))
        oracle_x = (len(bars) - 1) / 2 * width
        for i, (d, value) in enumerate(zip(domains, bars["oracle (best expert)"])):
            axes[0].annotate(report["oracle"][d]["expert"], (i + oracle_x, value), textcoords="offset points",
                             xytext=(0, 2), ha="center", va="bottom", fontsize=6, rotation=90)
        fig.suptitle(_evaluation_title(report, domains), fontsize=9)
        axes[0].set_xticks(range(len(domains)), domains)
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_formatter(ScalarFormatter())
        axes[0].yaxis.set_minor_formatter(ScalarFormatter())
        axes[0].tick_params(axis="y", which="both", labelsize=7)
        axes[0].set_ylabel("perplexity (held-out)")
        axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if routed:
            experts = report["experts"]
            share = [[report["routing"][d]["top1"][e] for e in experts] for d in domains]
            image = axes[1].imshow(share, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            axes[1].set_xticks(range(len(experts)), experts, rotation=45, ha="right")
            axes[1].set_yticks(range(len(domains)), domains)
            axes[1].set_title("top-1 share of tokens", fontsize=9)
            for r, row in enumerate(share):
                for c, value in enumerate(row):
                    axes[1].text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                                 color="white" if value < 0.5 else "black")
            fig.colorbar(image, ax=axes[1], label="share")
        save_png(fig, Path(out_png))


def _evaluation_title(report: dict[str, Any], domains: list[str]) -> str:
    """The figure's verdict: the worst domain's MoE/oracle ratio; and why the bars look flat, when they do."""
    ratios = {d: report["oracle"][d]["moe_ratio"] for d in domains if report["oracle"][d].get("moe_ratio")}
    title = f"{report.get('merge', 'MoE')}: held-out perplexity per domain"
    if ratios:
        worst = max(ratios, key=ratios.__getitem__)
        title += f"; worst MoE / oracle {ratios[worst]:.3f} ({worst})"
    spreads = [max(v) / min(v) for d in domains
               if len(v := [row[d] for row in report["perplexity"].values() if row[d]]) > 1]
    if spreads and max(spreads) < FLAT_SPREAD:
        title += (f"\nevery model is within {100 * (FLAT_SPREAD - 1):.0f}% of the others on every domain: the "
                  "experts barely differ here, so the bars look flat")
    return title
