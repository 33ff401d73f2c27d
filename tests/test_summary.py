"""The end-of-run summary: each merge's model and one line per check, read from the reports on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moeforge.check.summary import eval_label, run_summary, smoke_label


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_the_summary_names_the_model_and_each_checks_verdict(tmp_path):
    results = tmp_path / "results"
    (results / "good" / "model").mkdir(parents=True)
    (results / "good" / "model" / "moeforge.lock.json").write_text("{}")
    write(results / "good" / "smoke" / "report.json", {"passed": True})
    write(results / "good" / "eval" / "report.json",
          {"oracle": {"code": {"moe_ratio": 1.04}, "math": {"moe_ratio": 1.21}, "cooking": {"moe_ratio": 0.99}}})
    write(results / "good" / "reproduce" / "report.json", {"verdict": "identical"})
    write(results / "bad" / "smoke" / "report.json", {"passed": False, "errors": ["generation is empty"]})
    text = run_summary(["good", "bad"], results)
    lines = text.splitlines()
    assert lines[1] == "good:" and lines[2].split() == ["model", f"{results}/good/model/"]
    assert "smoke test  passed" in lines[3] and lines[3].endswith(f"[{results}/good/smoke/report.md]")
    assert "worst domain math: MoE perplexity 1.210x the best dense expert's (3 domain(s))" in lines[4]
    assert "reproduce   identical" in lines[5]
    assert lines[6:] == ["bad:", "  model       not built (or not published: it did not pass its checks)",
                         f"  smoke test  FAILED: generation is empty  [{results}/bad/smoke/report.md]"]


def test_a_damaged_report_does_not_break_the_summary(tmp_path):
    results = tmp_path / "results"
    (results / "m" / "smoke").mkdir(parents=True)
    (results / "m" / "smoke" / "report.json").write_text("[not json")
    assert run_summary(["m"], results).splitlines()[2:] == [
        "  model       not built (or not published: it did not pass its checks)"]


def test_reports_name_paths_without_the_machines_directories(tmp_path, monkeypatch):
    """Relative to the working directory, by Hub id and commit in the cache, as moeforge/... when packaged."""
    import moeforge
    from moeforge.io.files import shown_path

    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "resources" / "demo" / "base") == "resources/demo/base"
    cached = tmp_path.parent / "hf" / "hub" / "models--acme--base" / "snapshots" / ("1" * 40) / "model.safetensors"
    assert shown_path(cached) == f"acme/base@{'1' * 40}/model.safetensors"
    packaged = Path(moeforge.__file__).parent / "data" / "domains" / "code" / "heldout.txt"
    assert shown_path(packaged) == "moeforge/data/domains/code/heldout.txt"
    assert shown_path("/srv/models/llama") == "…/models/llama"


def test_figure_labels_give_the_verdict_and_its_numbers(tmp_path):
    """`snakemake --report` labels each figure with these, read from the job's report when the page is made."""
    write(tmp_path / "smoke.json", {"passed": True, "comparison": {"kl_mean": 0.01234, "top1_agreement": 0.974},
                                    "warnings": ["dead expert 'x'"]})
    write(tmp_path / "failed.json", {"passed": False, "errors": ["identity mismatch"], "comparison": None})
    write(tmp_path / "eval.json", {"oracle": {"code": {"moe_ratio": 1.04}, "math": {"moe_ratio": 1.21}}})
    assert smoke_label(tmp_path / "smoke.json") == (
        "passed; mean KL(base || merged) 0.0123 nats; top-1 agreement with the base 97%; 1 warning(s)")
    assert smoke_label(tmp_path / "failed.json") == "FAILED: identity mismatch; 0 warning(s)"
    assert eval_label(tmp_path / "eval.json") == (
        "worst domain math: MoE perplexity 1.210x the best dense expert's (2 domain(s))")
    assert smoke_label(tmp_path / "missing.json") == "no report"


def _search(metric: str, *merges: str) -> dict:
    return {"metric": metric, "candidates": [{"merge": m, "settings": {}} for m in merges]}


def test_a_search_is_one_line_with_its_best_candidate(tmp_path):
    results = tmp_path / "results"
    for merge in ("s-k1", "s-k2"):
        write(results / merge / "eval" / "report.json", {"oracle": {}})
    write(results / "search" / "s" / "ranking.json",
          {"metric": {"name": "worst_moe_ratio"}, "candidates": [{"merge": "s-k2", "metric": 1.1}, {"merge": "s-k1"}]})
    searches = {"s": _search("worst_moe_ratio", "s-k1", "s-k2"), "unranked": _search("worst_moe_ratio", "unranked-k1")}
    lines = run_summary([], results, searches=searches).splitlines()
    assert lines[1] == f"search s: best s-k2 (worst_moe_ratio 1.1) of 2 candidates  [{results}/search/s/ranking.md]"
    assert lines[2] == "search unranked: not ranked (its candidates are not all evaluated)"


@pytest.mark.parametrize("configured, evaluated_since", [
    (_search("worst_moe_ratio", "s-k1", "s-k3"), False),  # the grid was edited, the new candidate not ranked yet
    (_search("mean_moe_ratio", "s-k1", "s-k2"), False),  # the metric was changed
    (_search("worst_moe_ratio", "s-k1", "s-k2"), True),  # a candidate was rebuilt and evaluated since
])
def test_a_ranking_of_an_earlier_run_is_not_shown_as_the_searchs(tmp_path, configured, evaluated_since):
    """A run stopped before the ranking leaves the last one on disk: the summary does not show it as current."""
    results = tmp_path / "results"
    ranking = results / "search" / "s" / "ranking.json"
    for merge in ("s-k1", "s-k2"):
        write(results / merge / "eval" / "report.json", {"oracle": {}})
    write(ranking, {"metric": {"name": "worst_moe_ratio"}, "candidates": [{"merge": "s-k2", "metric": 1.1},
                                                                          {"merge": "s-k1", "metric": 1.2}]})
    if evaluated_since:
        os.utime(results / "s-k1" / "eval" / "report.json", (ranking.stat().st_mtime + 5,) * 2)
    line = run_summary([], results, searches={"s": configured}).splitlines()[1]
    assert line.startswith(f"search s: not ranked as configured ({results}/search/s/ranking.md ranks an earlier"), line
