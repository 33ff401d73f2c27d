"""The report figures say what they show: titles inside the figure, the oracle drawn, a flat chart explained."""

from __future__ import annotations

import matplotlib.figure
from matplotlib.backends.backend_agg import FigureCanvasAgg

from moeforge.check import plots


def eval_report(perplexity: dict) -> dict:
    domains = list(next(iter(perplexity.values())))
    experts = [m for m in perplexity if m not in ("base", "moe")]
    oracle = {}
    for d in domains:
        best = min(experts, key=lambda e: perplexity[e][d])
        oracle[d] = {"expert": best, "perplexity": perplexity[best][d],
                     "moe_ratio": perplexity["moe"][d] / perplexity[best][d]}
    return {"merge": "m", "domains": {d: {} for d in domains}, "perplexity": perplexity, "oracle": oracle,
            "routing": {d: None for d in domains}, "experts": experts}


def test_the_evaluation_title_gives_the_worst_domain():
    report = eval_report({"base": {"a": 4.0, "b": 5.0}, "x": {"a": 2.0, "b": 6.0}, "y": {"a": 5.0, "b": 3.0},
                          "moe": {"a": 2.2, "b": 3.9}})
    assert plots._evaluation_title(report, ["a", "b"]) == "m: held-out perplexity per domain; worst MoE / oracle 1.300 (b)"


def test_a_flat_chart_says_why():
    report = eval_report({"base": {"a": 4.0}, "x": {"a": 4.01}, "y": {"a": 4.02}, "moe": {"a": 4.0}})
    assert "the experts barely differ here" in plots._evaluation_title(report, ["a"])


def test_titles_stay_inside_their_figures(tmp_path, monkeypatch):
    """Every text of the figures lies within the figure (a narrow gate figure clipped its title)."""
    figures = []
    save = plots.save_png

    def keep(fig: matplotlib.figure.Figure, path):
        figures.append(fig)
        save(fig, path)

    monkeypatch.setattr(plots, "save_png", keep)
    cosine = [[1.0, 0.2], [0.2, 1.0]]
    plots.plot_gate_similarity({"layers": [{"layer": 0, "cosine": cosine}], "experts": ["alpha", "beta"]},
                               tmp_path / "g.png")
    report = eval_report({"base": {"a": 4.0, "b": 5.0}, "x": {"a": 2.0, "b": 6.0}, "y": {"a": 5.0, "b": 3.0},
                          "moe": {"a": 2.2, "b": 3.9}})
    plots.plot_evaluation(report, tmp_path / "e.png")
    for fig in figures:
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        box = fig.bbox
        title = fig._suptitle
        assert title is not None
        extent = title.get_window_extent(renderer)
        assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1, title.get_text()


def test_the_expert_load_figure_gives_the_verdict(tmp_path, monkeypatch):
    figures = []
    save = plots.save_png
    monkeypatch.setattr(plots, "save_png", lambda fig, path: (figures.append(fig), save(fig, path)))
    report = {"passed": True, "build": {"merge": "m"},
              "routing": {"experts": ["a", "b"], "top_k": 1, "layers": [{"layer": 0, "load_share": [0.5, 0.5]}]}}
    plots.plot_expert_load(report, tmp_path / "load.png")
    (axes,) = figures[0].axes[:1]
    assert axes.get_title().replace("\n", " ").startswith("m: smoke test passed; share of top-1 slots")
