"""The ranking's figure: each candidate's metric (bars, best on top) beside its MoE / oracle per domain.

Drawn as check/plots.py draws (Agg canvas, default style, PNG without the Software tag), so a rerun
gives the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from matplotlib import style
from matplotlib.figure import Figure

from moeforge.check.plots import save_png


def plot_ranking(ranking: Mapping[str, Any], out_png: Path) -> None:
    """Bars show the order at a glance; the heatmap shows which domain holds each candidate back."""
    rows = ranking["candidates"]
    names = [row["merge"] for row in rows]
    domains = list(rows[0]["moe_ratio"])
    values = [math.nan if row["metric"] is None else row["metric"] for row in rows]
    ratios = [[math.nan if row["moe_ratio"][d] is None else row["moe_ratio"][d] for d in domains] for row in rows]
    with style.context("default"):
        fig = Figure(figsize=(6 + 0.9 * len(domains), 1.6 + 0.35 * len(rows)), layout="constrained")
        bars, heat = fig.subplots(1, 2, width_ratios=[2, max(1, len(domains) * 0.6)], sharey=True)
        y = list(range(len(rows)))
        bars.barh(y, values, color=["tab:green"] + ["tab:blue"] * (len(rows) - 1))
        bars.set_yticks(y, names, fontsize=7)
        bars.invert_yaxis()
        bars.set_xlabel(f"{ranking['metric']['name']} (lower is better)", fontsize=8)
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            bars.set_xlim(min(finite) * 0.98, max(finite) * 1.01)
        for i, value in enumerate(values):
            bars.annotate(f"{value:.4f}", (value, i), xytext=(2, 0), textcoords="offset points", va="center",
                          fontsize=6)
        image = heat.imshow(ratios, cmap="viridis_r", aspect="auto", interpolation="nearest")
        heat.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=7)
        heat.set_title("MoE / oracle perplexity", fontsize=8)
        for r, row in enumerate(ratios):
            for c, value in enumerate(row):
                # viridis_r is light at its low (good) end and dark at its high end.
                light = math.isfinite(value) and image.norm(value) < 0.5
                heat.text(c, r, f"{value:.3f}", ha="center", va="center", fontsize=6,
                          color="black" if light else "white")
        fig.colorbar(image, ax=heat)
        fig.suptitle(f"search {ranking['search']}: best {ranking['best']}", fontsize=9)
        save_png(fig, Path(out_png))
