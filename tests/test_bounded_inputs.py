"""Inputs that would take unbounded memory or time are refused early: YAML aliases, huge messages."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeforge.errors import MAX_PART, RecipeError
from moeforge.io.published import RECIPE_NAME
from moeforge.io.yaml_doc import MAX_EXPANDED_VALUES, expanded_size, parse_yaml
from moeforge.plan.published_merge import merge_from_published
from moeforge.plan.recipe import load_recipe


def laughs(levels: int, width: int = 10) -> str:
    """The "billion laughs" document: each level lists the one below `width` times (width**levels values)."""
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    lines.append(f"base_model: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_the_expanded_size_counts_each_alias_as_written_out():
    assert expanded_size({"a": [1, 2], "b": "x"}) == 5
    shared = [1, 2, 3]
    assert expanded_size([shared, shared]) == 1 + 2 * 4


def test_billion_laughs_is_refused_without_expanding():
    text = laughs(9)  # 10**8 values as expanded, a few hundred bytes as written
    assert len(text) < 700
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        parse_yaml(text, "my.yaml", RecipeError)
    assert time.perf_counter() - start < 5
    assert str(info.value) == (f"my.yaml: its YAML aliases expand to more than {MAX_EXPANDED_VALUES:,} values -> "
                               "write the values out, or use fewer nested aliases (*name); a recipe or config needs "
                               "far fewer")


def test_a_document_of_ordinary_aliases_is_read():
    doc = parse_yaml("p: &p [a, b]\nexperts: [{positive_prompts: *p}, {positive_prompts: *p}]\n", "r", RecipeError)
    assert doc["experts"][1]["positive_prompts"] == ["a", "b"]


def test_a_self_referring_alias_is_refused():
    with pytest.raises(RecipeError, match="an alias refers to a value that contains it"):
        parse_yaml("a: &a [1, *a]\n", "r.yaml", RecipeError)


def test_malformed_yaml_names_the_place():
    with pytest.raises(RecipeError, match=r"^r.yaml: not valid YAML: line 2 column"):
        parse_yaml("a: [1\nb: 2\n", "r.yaml", RecipeError)


def test_every_message_part_is_bounded_and_escaped():
    error = RecipeError("x" * (MAX_PART * 50) + "\x1b[2J", "key\x07", "fix")
    assert len(error.what) < MAX_PART + 40 and error.what.endswith("[cut: the value is longer]")
    assert error.where == "key\\x07"
    assert RecipeError("line one\nline two").what == "line one\nline two"


# ---- every YAML a user hands over: a recipe, a published recipe, the workflow config --------------

REPO = Path(__file__).resolve().parents[1]


def test_a_recipe_of_billion_laughs_is_refused(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(9))
    with pytest.raises(RecipeError, match=f"^{path}: its YAML aliases expand to more than"):
        load_recipe(path)


def test_a_published_recipe_of_billion_laughs_is_refused(tmp_path):
    (tmp_path / RECIPE_NAME).write_text(laughs(9).replace("base_model: *a8", "base_model: x\nexperts: *a8"))
    with pytest.raises(RecipeError, match="its YAML aliases expand to more than"):
        merge_from_published(str(tmp_path))


def test_a_config_of_billion_laughs_stops_the_workflow_with_one_short_message(tmp_path):
    (tmp_path / "my.yaml").write_text(laughs(9).replace("base_model: *a8", "merges: {m: {recipe: *a8}}"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "-n", "--configfile", str(tmp_path / "my.yaml")],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode != 0
    assert time.perf_counter() - start < 120
    output = proc.stdout + proc.stderr
    assert output.count("its YAML aliases expand to more than") == 1, output[-3000:]
    assert len(output) < 5000
