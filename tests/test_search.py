"""Searches: a grid expanded into named candidate merges, bad grids refused before any work, and a search
over the demo built with `snakemake search` and ranked by its candidates' eval reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moeforge.errors import MoeforgeError, RecipeError
from moeforge.search.figure import plot_ranking
from moeforge.search.grid import expand_search, searches_to_build
from moeforge.search.metrics import METRICS
from moeforge.search.ranking import rank, render_markdown

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def recipe_file(tmp_path: Path, **changes) -> str:
    """A three-expert recipe (expert_code, expert_math, expert_cooking) with hidden gates: only parsed here."""
    recipe = yaml.safe_load((REPO / "config/recipes/demo.yaml").read_text())
    recipe.pop("token_reduction")
    recipe["gate_mode"] = "hidden"
    recipe.update(changes)
    path = tmp_path / "start.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def test_a_grid_is_every_combination_with_readable_names(tmp_path):
    search = expand_search("s", {"recipe": recipe_file(tmp_path),
                                 "grid": {"gate_mode": ["hidden", "cheap_embed"], "experts_per_token": [1, 2]}})
    assert search.names == ["s-hidden-k1", "s-hidden-k2", "s-cheap_embed-k1", "s-cheap_embed-k2"]
    by_name = {c.name: c for c in search.candidates}
    assert by_name["s-cheap_embed-k1"].settings == {"gate_mode": "cheap_embed", "experts_per_token": 1}
    assert by_name["s-cheap_embed-k1"].recipe.gate_mode == "cheap_embed"
    assert by_name["s-cheap_embed-k1"].recipe.experts_per_token == 1
    # Every other key is the starting recipe's.
    assert by_name["s-hidden-k2"].document["experts"] == yaml.safe_load(Path(recipe_file(tmp_path)).read_text())["experts"]


def test_names_are_stable_when_the_grid_grows(tmp_path):
    start = recipe_file(tmp_path)
    small = expand_search("s", {"recipe": start, "grid": {"experts_per_token": [1], "seed": [0]}})
    large = expand_search("s", {"recipe": start, "grid": {"experts_per_token": [1, 2], "seed": [0, 7]}})
    assert small.names == ["s-k1-seed_0"]
    assert set(small.names) < set(large.names) and "s-k2-seed_7" in large.names


def test_expert_subsets_choose_k_and_listed(tmp_path):
    start = recipe_file(tmp_path, experts_per_token=1)
    chosen = expand_search("s", {"recipe": start, "grid": {"experts": {"choose": 2}}})
    assert chosen.names == ["s-code.math", "s-code.cooking", "s-math.cooking"]
    assert [c.settings["experts"] for c in chosen.candidates] == [
        ["expert_code", "expert_math"], ["expert_code", "expert_cooking"], ["expert_math", "expert_cooking"]]
    assert [e.source_model for e in chosen.candidates[1].recipe.experts] == [
        "resources/demo/expert_code", "resources/demo/expert_cooking"]
    listed = expand_search("s", {"recipe": start, "grid": {"experts": [["expert_cooking", 0], [1]]}})
    assert listed.names == ["s-cooking.code", "s-math"]
    assert [e.name for e in listed.candidates[0].recipe.experts] == ["expert_cooking", "expert_code"]


def test_a_candidate_drops_the_training_its_grid_values_leave_nothing_to_learn(tmp_path):
    """One expert's router sends every token to it whatever its weights, and shared_gate: always gives the shared
    experts no row: a hand-written recipe with training there is refused, a candidate the grid made drops it."""
    start = recipe_file(tmp_path, experts_per_token=1)
    subsets = expand_search("s", {"recipe": start, "grid": {"experts": [["expert_math"], ["expert_code", 2]]}})
    alone, pair = subsets.candidates
    assert alone.recipe.router_training is None and not alone.recipe.experts[0].train_texts
    assert pair.recipe.router_training is not None and all(e.train_texts for e in pair.recipe.experts)
    shared = {"source_model": "resources/demo/base", "positive_prompts": ["hello"], "train_texts": ["general.txt"]}
    start = recipe_file(tmp_path, shared_experts=[shared])
    gates = expand_search("s", {"recipe": start, "grid": {"shared_gate": ["prompts", "always"]}})
    assert [c.recipe.shared_experts[0].train_texts for c in gates.candidates] == [("general.txt",), ()]
    assert all(c.recipe.router_training is not None for c in gates.candidates)


def test_a_null_value_unsets_a_key_and_an_unreadable_name_becomes_a_digest(tmp_path):
    start = recipe_file(tmp_path, gate_mode="router_input", token_reduction="mean")
    search = expand_search("s", {"recipe": start, "grid": {"token_reduction": [None, "mean"],
                                                           "smoke_prompts": [["a b"], ["c"]]}})
    assert search.candidates[0].recipe.token_reduction == "last"
    names = search.names
    assert len(set(names)) == 4 and all(n.startswith("s-") for n in names)
    assert names == expand_search("s", {"recipe": start, "grid": {"token_reduction": [None, "mean"],
                                                                  "smoke_prompts": [["a b"], ["c"]]}}).names


@pytest.mark.parametrize("grid, key, words", [
    ({"gate_mod": ["hidden"]}, "gate_mod", "unknown key 'gate_mod'; did you mean 'gate_mode'?"),
    ({"gate_mode": ["hidden", "bogus"]}, "gate_mode", "'bogus' is not one of"),
    ({"experts_per_token": []}, "experts_per_token", "experts_per_token lists no value"),
    ({"experts_per_token": 2}, "experts_per_token", "must be a list"),
    ({"experts_per_token": [1, 4]}, "experts_per_token", "experts_per_token is 4 but the recipe has only 3"),
    ({"experts": {"choose": 4}}, "experts", "choose 4 of the starting recipe's 3 experts"),
    ({"experts": [["expert_code", "expert_baking"]]}, "experts", "'expert_baking' is not one of the starting"),
    ({"experts": {"choose": 1}, "experts_per_token": [2]}, "experts_per_token", "has only 1 expert"),
    ({"gate_mode.kind": ["x"]}, "gate_mode.kind", "gate_mode is not a mapping"),
    ({"no_such.method": ["x"]}, "no_such", "unknown key 'no_such'"),
    ({}, "grid", "the grid lists no key"),
    # A value listed twice, however it is written, or two values the recipe reads alike: one merge twice.
    ({"experts_per_token": [1, 1]}, "experts_per_token", "experts_per_token lists 1 twice"),
    ({"experts": [[0, 1], ["expert_code", "expert_math"]]}, "experts", 'lists ["expert_code", "expert_math"] twice'),
    ({"experts_per_token": [2, 2.0]}, "grid", "candidates mysearch-k2 (experts_per_token=2) and mysearch-k2.0"),
    ({"seed": [None, 0], "experts_per_token": [1]}, "grid", "(seed=null, experts_per_token=1) and mysearch-seed_0-k1"),
    # Two keys that set one value: which one won would depend on the grid's order.
    ({"router_training": [{"method": "layerwise"}], "router_training.method": ["end_to_end"]}, "grid",
     "router_training and router_training.method both set router_training.method"),
    ({"router_training.method": ["end_to_end"], "router_training": [None]}, "grid", "both set"),
])
def test_a_bad_grid_is_one_message_naming_the_search_and_the_key(tmp_path, grid, key, words):
    with pytest.raises(RecipeError) as caught:
        expand_search("mysearch", {"recipe": recipe_file(tmp_path), "grid": grid})
    message = str(caught.value)
    assert "searches: mysearch" in message and key in message and words in message, message
    assert "\n" not in message


def test_the_bound_on_candidates_is_the_runs(tmp_path):
    """Two searches of 200 candidates each are 400 builds, as one grid of them would be: refused, before any."""
    start = recipe_file(tmp_path)
    searches = {name: {"recipe": start, "grid": {"seed": list(range(200))}} for name in ("a", "b")}
    with pytest.raises(RecipeError, match=r"^searches: the 2 searches make 400 candidates, more than 256"):
        searches_to_build({"searches": searches}, set())


def test_a_bad_grid_value_is_fixed_in_the_grid(tmp_path):
    """A candidate's recipe is no file anyone wrote: a value of the wrong type is to be changed in the grid."""
    with pytest.raises(RecipeError) as caught:
        expand_search("s", {"recipe": recipe_file(tmp_path), "grid": {"experts_per_token": ["2"]}})
    assert caught.value.where == 'searches: s: candidate s-2 (experts_per_token="2")'
    assert caught.value.fix.startswith("fix that key or its value in the grid"), caught.value.fix


def test_choosing_among_many_experts_is_refused_from_the_count_alone(tmp_path):
    """{choose: 20} of 40 experts is 137846528820 subsets: refused at once, not listed first."""
    experts = [{"name": f"e{i}", "source_model": "resources/demo/expert_code", "positive_prompts": [f"p{i} a", f"q{i} b"]}
               for i in range(40)]
    with pytest.raises(RecipeError, match=r"searches: s: grid: experts: choose 20 of 40 experts makes 137846528820 "
                                          r"candidates, more than 256"):
        expand_search("s", {"recipe": recipe_file(tmp_path, experts=experts, router_training=None),
                            "grid": {"experts": {"choose": 20}}})


def test_a_start_that_cannot_be_read_names_the_search(tmp_path):
    """A lock or a published repo that cannot be read: its own message, under the search and the key."""
    with pytest.raises(RecipeError, match=r"^searches: s: lock: .*start\.yaml: not valid JSON"):
        expand_search("s", {"lock": recipe_file(tmp_path), "grid": {"seed": [1]}})
    with pytest.raises(MoeforgeError, match=r"^searches: s: published: .*no-such-dir"):
        expand_search("s", {"published": str(tmp_path / "no-such-dir"), "grid": {"seed": [1]}})


@pytest.mark.parametrize("content, words", [
    (b"base_model: [unclosed\n", "not valid YAML"),
    (b"base_model: caf\xe9\n", "not UTF-8 text"),
])
def test_a_starting_recipe_that_cannot_be_read_names_the_search(tmp_path, content, words):
    path = tmp_path / "start.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=rf"^searches: s: recipe: {re.escape(str(path))}: {words}"):
        expand_search("s", {"recipe": str(path), "grid": {"seed": [1]}})


def test_an_unknown_metric_and_a_taken_name_are_refused(tmp_path):
    start = recipe_file(tmp_path)
    with pytest.raises(RecipeError, match=r"searches: s: metric: unknown metric 'best'.*worst_moe_ratio"):
        expand_search("s", {"recipe": start, "grid": {"seed": [1]}, "metric": "best"})
    with pytest.raises(RecipeError, match=r"candidate 's-seed_1' has the name of a merge under merges"):
        searches_to_build({"searches": {"s": {"recipe": start, "grid": {"seed": [1]}}}}, {"s-seed_1"})
    with pytest.raises(RecipeError, match=r"^searches: s-k2: candidate 's-k2-seed_1' has the name of a candidate of "
                                          r"searches: s "):
        searches_to_build({"searches": {"s": {"recipe": start, "grid": {"experts_per_token": [2], "seed": [1]}},
                                        "s-k2": {"recipe": start, "grid": {"seed": [1]}}}}, set())


def test_the_config_schema_names_every_metric():
    """The config schema describes the metric key; it must offer exactly the metrics the ranking knows."""
    schema = yaml.safe_load((REPO / "src/moeforge/schemas/config.schema.yaml").read_text())
    described = schema["properties"]["searches"]["additionalProperties"]["properties"]["metric"]["description"]
    assert all(name in described for name in METRICS)


def _report(ratios: dict[str, float | None]) -> dict:
    return {"oracle": {d: {"moe_ratio": r} for d, r in ratios.items()},
            "perplexity": {"moe": {d: 2.0 for d in ratios}}}


def test_ties_rank_by_name_and_a_non_finite_number_ranks_last(tmp_path):
    record = {"search": "s", "metric": "worst_moe_ratio", "start": {"recipe": "r.yaml"}, "grid": {"seed": [1, 2, 3]},
              "candidates": [{"merge": m, "settings": {}} for m in ("s-c", "s-b", "s-a", "s-d")]}
    reports = {"s-c": _report({"x": 1.2, "y": 1.1}), "s-b": _report({"x": 1.0, "y": 1.2}),
               "s-a": _report({"x": None, "y": 1.0}), "s-d": _report({"x": 1.3, "y": 1.0})}
    ranking = rank(record, reports, {m: {"passed": True} for m in reports})
    assert [(row["merge"], row["metric"]) for row in ranking["candidates"]] == [
        ("s-b", 1.2), ("s-c", 1.2), ("s-d", 1.3), ("s-a", None)]
    assert ranking["best"] == "s-b" and [row["rank"] for row in ranking["candidates"]] == [1, 2, 3, 4]
    plot_ranking(ranking, tmp_path / "ranking.png")  # a null number is drawn as a gap
    assert (tmp_path / "ranking.png").read_bytes()[:4] == b"\x89PNG"
    record["metric"] = "mean_moe_ratio"
    assert rank(record, reports, {m: {} for m in reports})["best"] == "s-b"


def test_grid_values_stay_in_their_cells_of_the_ranking_table():
    """A prompt searched as a grid value holds `|`, backticks and line breaks: each stays in its cell."""
    from markdown_it import MarkdownIt

    prompts = [["def f(x):\n    return x | 1"], ["a `tick` and <b>"]]
    record = {"search": "s", "metric": "worst_moe_ratio", "start": {"recipe": "my `odd` | dir/r.yaml"},
              "grid": {"smoke_prompts": prompts, "seed": [1]},
              "candidates": [{"merge": f"s-{i}", "settings": {"smoke_prompts": p, "seed": 1}} for i, p in enumerate(prompts)]}
    reports = {f"s-{i}": _report({"x": 1.0 + i}) for i in range(2)}
    markdown = render_markdown(rank(record, reports, {m: {"passed": True} for m in reports}))
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    # A header and two rows of six cells: rank, candidate, the two grid keys, the metric, the one domain.
    assert sum(t.type == "tr_open" for t in tokens) == 3 and sum(t.type == "td_open" for t in tokens) == 12, markdown
    assert "return x \\| 1" in markdown and "&lt;b&gt;" in markdown and "``my `odd` | dir/r.yaml``" in markdown


def search_workdir(wd: Path, grid: dict, metric: str | None = None) -> Path:
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "demo.yaml").write_text((REPO / "config/recipes/demo.yaml").read_text())
    spec = {"recipe": "demo.yaml", "grid": grid, **({"metric": metric} if metric else {})}
    (wd / "config.yaml").write_text(yaml.safe_dump({"searches": {"ds": spec}}))
    return wd


def snakemake(wd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, *args, "-s", str(REPO / "Snakefile"), "-d", str(wd), "--configfile", str(wd / "config.yaml")]
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)


def test_a_bad_grid_stops_the_workflow_before_any_job(tmp_path):
    wd = search_workdir(tmp_path, {"experts": {"choose": 5}})
    proc = snakemake(wd, "search", "--cores", "1")
    assert proc.returncode != 0
    assert "searches: ds: grid: experts: choose 5 of the starting recipe's 3 experts" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (wd / "resources").exists() and not (wd / "results").exists()


def test_a_model_a_grid_value_names_that_is_not_there_is_told_under_the_candidate(tmp_path):
    """A grid over base_model with a typo: the message names the search, the candidate and its value, not just the
    path (which of a config's merges and candidates gave it, the model's own message cannot say)."""
    wd = search_workdir(tmp_path, {"base_model": ["resources/demo/base", "resources/demo/bse"]})
    proc = snakemake(wd, "-n", "search", "--cores", "1")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ('searches: ds: candidate ds-resources_demo_bse (base_model="resources/demo/bse"): resources/demo/bse: '
            "no such local directory") in output, output[-3000:]
    assert "Traceback" not in output and not (wd / "results").exists()


def test_the_search_target_with_no_search_configured_says_so(tmp_path):
    """`snakemake search` with a config that lists no search (a --configfile left out, or another file given) is
    refused: it did nothing and succeeded."""
    wd = search_workdir(tmp_path, {"seed": [1]})
    (wd / "config.yaml").write_text(yaml.safe_dump({"merges": {"m": {"recipe": "demo.yaml"}}}))
    proc = snakemake(wd, "-n", "search", "--cores", "1")
    assert proc.returncode != 0
    assert "snakemake search: the config lists no search -> give a config file with searches:" in proc.stdout + proc.stderr


def test_each_model_is_told_under_where_the_config_gave_it(tmp_path):
    """A model of the starting recipe is the starting point's; one a grid value brings in, the first candidate's."""
    start = recipe_file(tmp_path)
    search = expand_search("s", {"recipe": start, "grid": {"base_model": ["resources/demo/base", "elsewhere/base"]}})
    sources = search.model_sources()
    assert sources["resources/demo/base"] == sources["resources/demo/expert_code"] == f"searches: s: recipe: {start}"
    assert sources["elsewhere/base"] == 'searches: s: candidate s-elsewhere_base (base_model="elsewhere/base")'


def test_searches_alone_build_no_demo_and_join_the_default_target(tmp_path):
    wd = search_workdir(tmp_path, {"experts_per_token": [1, 2]})
    proc = snakemake(wd, "-n", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results/search/ds/ranking.json" in proc.stdout
    assert "results/ds-k1/search/recipe.yaml" in proc.stdout and "results/ds-k2/search/recipe.yaml" in proc.stdout
    assert "results/demo/" not in proc.stdout
    # The jobs the step count leaves out until validate has run are said once for the run, not once per candidate.
    assert proc.stdout.count("the step count leaves out") == 1, proc.stdout[:3000]


@pytest.fixture(scope="module")
def demo_search(tmp_path_factory) -> Path:
    wd = search_workdir(tmp_path_factory.mktemp("search"), {"experts_per_token": [1, 2]})
    proc = snakemake(wd, "search", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return wd


def _eval(wd: Path, merge: str) -> dict:
    return json.loads((wd / "results" / merge / "eval" / "report.json").read_text())


@pytest.mark.slow
def test_snakemake_search_ranks_the_candidates_by_their_eval_reports(demo_search):
    ranking = json.loads((demo_search / "results/search/ds/ranking.json").read_text())
    worst = {m: max(e["moe_ratio"] for e in _eval(demo_search, m)["oracle"].values()) for m in ("ds-k1", "ds-k2")}
    assert [row["merge"] for row in ranking["candidates"]] == sorted(worst, key=worst.__getitem__)
    assert ranking["best"] == ranking["candidates"][0]["merge"]
    assert ranking["metric"]["name"] == "worst_moe_ratio"
    for place, row in enumerate(ranking["candidates"], start=1):
        report = _eval(demo_search, row["merge"])
        assert row["rank"] == place and row["smoke_passed"] is True
        assert row["metric"] == worst[row["merge"]]
        assert row["moe_ratio"] == {d: e["moe_ratio"] for d, e in report["oracle"].items()}
        assert row["settings"] == {"experts_per_token": int(row["merge"][-1])}
        assert (demo_search / row["model"] / "moeforge.lock.json").is_file()
        recipe = yaml.safe_load((demo_search / "results" / row["merge"] / "search/recipe.yaml").read_text())
        assert recipe["experts_per_token"] == row["settings"]["experts_per_token"]
    md = (demo_search / "results/search/ds/ranking.md").read_text().splitlines()
    table = [line for line in md if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [line.split(" | ")[1] for line in table] == [row["merge"] for row in ranking["candidates"]]
    assert f"**{worst[ranking['best']]:.4f}**" in table[0]
    assert (demo_search / "results/search/ds/ranking.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_another_metric_reranks_without_rebuilding(demo_search):
    search_workdir(demo_search, {"experts_per_token": [1, 2]}, metric="mean_moe_perplexity")
    proc = snakemake(demo_search, "search", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ran = {line.split()[-1].rstrip(":") for line in proc.stderr.splitlines() if line.strip().startswith(("rule ", "localrule "))}
    assert ran == {"rank_search", "search"}, ran
    ranking = json.loads((demo_search / "results/search/ds/ranking.json").read_text())
    mean = {m: sum(_eval(demo_search, m)["perplexity"]["moe"].values()) / 3 for m in ("ds-k1", "ds-k2")}
    assert [row["merge"] for row in ranking["candidates"]] == sorted(mean, key=mean.__getitem__)
    assert ranking["metric"]["name"] == "mean_moe_perplexity"


@pytest.mark.slow
def test_dropping_a_candidate_rescores_no_dense_model(demo_search):
    """Each dense model is scored once for every candidate: a grid without the candidate whose fetched weights the
    scores were first read through does not change the scoring jobs' inputs, so nothing but the ranking reruns."""
    search_workdir(demo_search, {"experts_per_token": [2]})
    try:
        proc = snakemake(demo_search, "search", "-n", "--cores", "2")
    finally:
        search_workdir(demo_search, {"experts_per_token": [1, 2]})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    ran = {line.split()[-1].rstrip(":") for line in lines if line.startswith(("rule ", "localrule "))}
    assert ran == {"rank_search", "search"}, ran


def test_a_grid_over_the_router_training_method_sets_the_nested_key(tmp_path):
    """A dotted key reaches into router_training; a method the recipe refuses is refused for the search."""
    search = expand_search("s", {"recipe": recipe_file(tmp_path),
                                 "grid": {"router_training.method": ["layerwise", "end_to_end"]}})
    methods = {c.name: c.recipe.router_training.method for c in search.candidates}
    assert sorted(methods.values()) == ["end_to_end", "layerwise"]
    assert all(method in name for name, method in methods.items())
    with pytest.raises(RecipeError, match="router_training.method"):
        expand_search("s", {"recipe": recipe_file(tmp_path), "grid": {"router_training.method": ["by_hand"]}})


def test_a_grid_compares_trained_routers_with_untrained_ones(tmp_path):
    """router_training: [null, ...] unsets the training, and the untrained candidate reads no texts; a recipe
    with texts and no training is still refused when it is the starting recipe."""
    search = expand_search("s", {"recipe": recipe_file(tmp_path),
                                 "grid": {"router_training": [None, {"method": "layerwise"}]}})
    trained = {c.name: c.recipe.router_training for c in search.candidates}
    assert sorted(trained) == ["s-router_training_method_layerwise", "s-router_training_null"]
    assert sorted(t is None for t in trained.values()) == [False, True]
    for candidate in search.candidates:
        texts = [e.train_texts for e in candidate.recipe.experts]
        assert all(texts) if candidate.recipe.router_training else not any(texts), candidate.name
    with pytest.raises(RecipeError, match="train_texts"):
        expand_search("s", {"recipe": recipe_file(tmp_path, router_training=None), "grid": {"gate_mode": ["hidden"]}})


def test_a_bad_search_entry_is_told_how_a_search_is_written(tmp_path):
    from moeforge.plan.workflow_config import checked_config

    with pytest.raises(RecipeError) as info:
        checked_config({"searches": {"s": {"recipe": recipe_file(tmp_path)}}})
    assert "searches.s" in info.value.what and "grid: {key: [value, ...]}" in info.value.fix
    with pytest.raises(RecipeError) as info:
        checked_config({"merges": {"m": {"recipes": "x.yaml"}}})
    assert "each merge is name: {recipe: PATH}" in info.value.fix


@pytest.mark.parametrize("searches, words", [
    ({"s": {"grid": {1: ["a"]}}}, "searches.s.grid: 1 is not of type 'string'"),  # YAML reads `1:` as a number
    ({"s": {"grid": {None: ["a"]}}}, "searches.s.grid: None is not of type 'string'"),  # and `null:` as null
    ({1: {"grid": {"seed": [1]}}}, "searches: 1 is not of type 'string'"),
])
def test_a_key_yaml_reads_as_no_string_is_refused_in_the_config(tmp_path, searches, words):
    """A grid key or a search name written as a number, null or a boolean: one message, not a Python error."""
    from moeforge.plan.workflow_config import checked_config

    for spec in searches.values():
        spec["recipe"] = recipe_file(tmp_path)
    with pytest.raises(RecipeError, match=re.escape(words)):
        checked_config({"searches": searches})


@pytest.mark.parametrize("grid, words", [
    ("seed: [2024-01-01]", "searches.s.grid.seed[0]: datetime.date(2024, 1, 1) is no JSON value"),
    ("router_training: [{method: layerwise, seed: 2024-01-01}]", "searches.s.grid.router_training[0].seed: "),
    ("seed: [!!binary aGVsbG8=]", "searches.s.grid.seed[0]: b'hello' is no JSON value (a bytes"),
])
def test_a_grid_value_yaml_reads_as_no_json_value_is_refused_in_the_config(tmp_path, grid, words):
    """The grid takes any recipe value, so the schema leaves its type open: a date or bytes is refused by the
    config's own check, not met as a Python error where the candidates' names and records are written."""
    from moeforge.plan.workflow_config import checked_config

    spec = {"recipe": recipe_file(tmp_path), "grid": yaml.safe_load(grid)}
    with pytest.raises(RecipeError, match=re.escape(words)):
        checked_config({"searches": {"s": spec}})


@pytest.mark.parametrize("length", [56, 63])
def test_a_search_name_too_long_for_its_candidates_names_is_refused_in_the_config(tmp_path, length):
    """A candidate's name is the search's and at least 9 characters more: a longer search name is refused as the
    user wrote it, not as a candidate's name the user never wrote."""
    from moeforge.plan.workflow_config import checked_config

    name = ("s12" * 30)[:length]
    with pytest.raises(RecipeError, match=rf"searches: '{name}' does not match"):
        checked_config({"searches": {name: {"recipe": recipe_file(tmp_path), "grid": {"seed": [1]}}}})
    # At 55 characters even the digest name fits.
    longest = expand_search(name[:55], {"recipe": recipe_file(tmp_path), "grid": {"smoke_prompts": [["a b"]]}})
    assert re.fullmatch(rf"{name[:55]}-[0-9a-f]{{8}}", longest.names[0]), longest.names
