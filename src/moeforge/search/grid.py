"""A search's grid expanded into candidate merges: each combination of values is one recipe.

A grid maps recipe keys to lists of values. A key is any recipe key, or a dotted path into a nested
recipe mapping (``router_training.method``); the values are put into the starting recipe's document
and each candidate is validated by the recipe's own parsing, so a grid can search any key the recipe
has, and an unknown key or an invalid value is refused as the recipe would refuse it, naming the
search and the candidate. ``experts`` is the one key whose values are not recipe values but subsets of
the starting recipe's experts: ``{choose: k}`` (every k of them, in recipe order) or a list of subsets,
each a list of expert names or 0-based indices.

Candidate names are ``<search>-<label>-<label>...``, one label per grid key in the grid's order, so a
name says what the candidate is and stays the same when other values are added to the grid.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from moeforge.errors import RecipeError
from moeforge.io.files import write_text
from moeforge.io.names import PERIODIC_END, check_merge_name, check_wildcard_name, is_merge_name
from moeforge.plan.recipe import Recipe, parse_recipe
from moeforge.search.metrics import DEFAULT_METRIC, METRICS
from moeforge.search.start import START_KEYS, start_document

#: The grid key whose values are subsets of the starting recipe's experts.
EXPERTS_KEY = "experts"
#: Short labels of keys whose values are numbers (``k2``); any other number is labelled ``<key>_<value>``.
SHORT_LABELS = {"experts_per_token": "k"}
#: More candidates than this, in one search or in all of a run's, is a grid written by mistake (each candidate
#: is a whole build and evaluation).
MAX_CANDIDATES = 256
_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")
#: What to do about a candidate's unknown key, or value of the wrong type: both came from the grid.
_CANDIDATE_FIX = ("fix that key or its value in the grid: each value is the key's whole value, so a key that takes a "
                  "list takes a list of lists (docs/recipe.md lists every recipe key and its type)")


@dataclass(frozen=True)
class Option:
    """One value of one grid key: what the ranking records, its label in names, and how it edits a recipe."""

    key: str
    setting: Any
    label: str
    apply: Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Candidate:
    """One merge of a search: its name, the grid values that made it, its recipe document and Recipe, and where
    it comes from in the config's words (the search, the candidate and its values), which a message about it says."""

    name: str
    settings: dict[str, Any]
    document: dict[str, Any]
    recipe: Recipe
    where: str


@dataclass(frozen=True)
class Search:
    """A search as configured, with its starting recipe, and its candidates expanded and validated."""

    name: str
    metric: str
    start: dict[str, str]
    grid: dict[str, Any]
    recipe: Recipe
    candidates: tuple[Candidate, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.candidates]

    def model_sources(self) -> dict[str, str]:
        """Each model the search uses -> where it was given, in the config's words: the starting point for a model
        of the starting recipe (a published recipe's base, say), else the first candidate whose grid value names it."""
        (key, value), = self.start.items()
        sources = dict.fromkeys(self.recipe.source_models, f"searches: {self.name}: {key}: {value}")
        for candidate in self.candidates:
            for ref in candidate.recipe.source_models:
                sources.setdefault(ref, candidate.where)
        return sources

    def record(self) -> dict[str, Any]:
        """What the ranking job needs (JSON types): the search, its metric and each candidate's settings."""
        return {"search": self.name, "metric": self.metric, "start": self.start, "grid": self.grid,
                "candidates": [{"merge": c.name, "settings": c.settings} for c in self.candidates]}


def searches_to_build(config: Mapping[str, Any], merges: set[str]) -> dict[str, Search]:
    """Every configured search, expanded; a candidate may not take the name of a merge or of another's."""
    searches = {name: expand_search(name, spec) for name, spec in (config.get("searches") or {}).items()}
    # The bound is the run's: many searches of many candidates each are as many builds as one grid of them all.
    _check_count("searches", f"the {len(searches)} searches make", sum(len(s.candidates) for s in searches.values()))
    taken = {m: "a merge under merges" for m in merges}
    for search in searches.values():
        for candidate in search.candidates:
            if candidate.name in taken:
                raise RecipeError(f"candidate {candidate.name!r} has the name of {taken[candidate.name]}",
                                  f"searches: {search.name}", "rename this search, or the other search or merge")
            taken[candidate.name] = f"a candidate of searches: {search.name}"
    return searches


def expand_search(name: str, spec: Mapping[str, Any]) -> Search:
    """The search's candidates, each validated as a recipe; the first problem is one message naming the search."""
    where = f"searches: {name}"
    check_wildcard_name(name, "searches", RecipeError)
    metric = spec.get("metric", DEFAULT_METRIC)
    if metric not in METRICS:
        raise RecipeError(f"unknown metric {metric!r}", f"{where}: metric", f"use one of {', '.join(METRICS)}")
    document, recipe = start_document(spec, where)
    grid = spec.get("grid") or {}
    if not grid:
        raise RecipeError("the grid lists no key", f"{where}: grid",
                          "give grid: {key: [value, ...]}, e.g. gate_mode: [hidden, router_input]")
    options = [_options(where, key, values, document, recipe) for key, values in grid.items()]
    for column in options:
        _check_repeats(f"{where}: grid", column)
    _check_overlaps(f"{where}: grid", list(grid))
    _check_count(f"{where}: grid", "the grid makes", math.prod(len(column) for column in options))
    combos = list(itertools.product(*options))
    names = _names(name, combos)
    candidates = tuple(_candidate(where, candidate, combo, document) for candidate, combo in zip(names, combos))
    _check_distinct(f"{where}: grid", candidates)
    start = {key: spec[key] for key in START_KEYS if key in spec}
    return Search(name=name, metric=metric, start=start, grid=dict(grid), recipe=recipe, candidates=candidates)


def _candidate(where: str, name: str, combo: tuple[Option, ...], start: dict[str, Any]) -> Candidate:
    document = copy.deepcopy(start)
    for option in combo:
        option.apply(document)
    _drop_unread_texts(document)
    settings = {option.key: option.setting for option in combo}
    where = f"{where}: candidate {name} ({_shown(settings)})"
    recipe = parse_recipe(document, where, _CANDIDATE_FIX)
    return Candidate(name=name, settings=settings, document=document, recipe=recipe, where=where)


def _check_count(where: str, made_by: str, count: int) -> None:
    """Refused from the sizes alone, before any candidate (or expert subset) is listed: ``choose`` over many
    experts makes more subsets than memory holds."""
    if count > MAX_CANDIDATES:
        raise RecipeError(f"{made_by} {count} candidates, more than {MAX_CANDIDATES}", where,
                          "search fewer values at once")


def _check_repeats(where: str, column: list[Option]) -> None:
    """A value listed twice (an expert subset by names and again by indices, say) would make each candidate twice."""
    seen = set()
    for option in column:
        value = json.dumps(option.setting, sort_keys=True)
        if value in seen:
            raise RecipeError(f"{option.key} lists {value} twice", f"{where}: {option.key}", "list each value once")
        seen.add(value)


def _check_overlaps(where: str, keys: list[str]) -> None:
    """Two grid keys where one is a path into the other (``router_training`` and ``router_training.method``)
    would both set one value, and which one wins would depend on the grid's order."""
    for outer, inner in itertools.permutations(keys, 2):
        if inner.split(".")[:len(outer.split("."))] == outer.split("."):
            raise RecipeError(f"{outer} and {inner} both set {inner}", where,
                              f"search {inner} inside the values of {outer}, or leave one of them out")


def _check_distinct(where: str, candidates: tuple[Candidate, ...]) -> None:
    """Two candidates with one recipe would build and rank one merge twice: a value listed twice, or two values
    the recipe reads alike (``null`` and the key's default, ``2`` and ``2.0``)."""
    seen: dict[str, Candidate] = {}
    for candidate in candidates:
        recipe = json.dumps(candidate.recipe.to_dict(), sort_keys=True)
        first = seen.setdefault(recipe, candidate)
        if first is not candidate:
            raise RecipeError(f"candidates {first.name} ({_shown(first.settings)}) and {candidate.name} "
                              f"({_shown(candidate.settings)}) are the same merge", where,
                              "list each value once (null sets the key's default; 2 and 2.0 are one number; an alias "
                              "is the name it stands for)")


def _shown(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in settings.items())


def _drop_unread_texts(document: dict[str, Any]) -> None:
    """What a candidate's grid values leave unread goes, where a recipe written by hand with it would be refused
    (the starting recipe still is):

    * ``router_training: [null, ...]`` (trained routers against untrained ones): no training, so no texts;
    * an expert subset of one (with no gated shared expert): a router of one row sends every token to its
      expert whatever its weights, so training would change nothing, and goes with its texts;
    * ``shared_gate: always``: the shared experts have no gate row, so their texts train nothing.
    """
    shared_gated = bool(document.get("shared_experts")) and document.get("shared_gate", Recipe.shared_gate) == "prompts"
    if len(document.get("experts") or []) + shared_gated < 2:
        document.pop("router_training", None)
    if document.get("router_training") is None:
        unread = ("experts", "shared_experts")
    else:
        unread = () if shared_gated else ("shared_experts",)
    for group in unread:
        for expert in document.get(group) or []:
            if isinstance(expert, dict):
                expert.pop("train_texts", None)


def _options(where: str, key: str, values: Any, document: dict[str, Any], recipe: Recipe) -> list[Option]:
    where = f"{where}: grid: {key}"
    if key == EXPERTS_KEY:
        return _expert_options(where, values, document, recipe)
    if not isinstance(values, list):
        raise RecipeError(f"the values of {key} must be a list, not {type(values).__name__}", where,
                          f"write {key}: [value, ...]")
    if not values:
        raise RecipeError(f"{key} lists no value", where, f"give {key} at least one value, or leave it out")
    path = key.split(".")
    if not all(path):
        raise RecipeError(f"{key!r} is not a recipe key", where, "use a recipe key, or a dotted path such as a.b")
    _check_path(where, path, document)
    return [Option(key, value, _label(path[-1], value), _setter(path, value)) for value in values]


def _check_path(where: str, path: list[str], document: Mapping[str, Any]) -> None:
    """Every mapping a dotted key goes through is a mapping in the starting recipe (or absent: created)."""
    node: Any = document
    for depth, part in enumerate(path[:-1]):
        node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            raise RecipeError(f"{'.'.join(path[:depth + 1])} is not a mapping in the starting recipe, so "
                              f"{'.'.join(path)} cannot be set", where, "use a key of a nested mapping")


def _setter(path: list[str], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(document: dict[str, Any]) -> None:
        node = document
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = copy.deepcopy(value)
    return apply


def _label(key: str, value: Any) -> str:
    """A value's part of a candidate name: a string as it is, a number after its key's short label, a mapping of
    such values as its keys and values (``router_training_method_layerwise``); anything else by a digest."""
    if isinstance(value, str):
        return _UNSAFE.sub("_", value)
    if value is None or isinstance(value, (bool, int, float)):
        shown = json.dumps(value)
        return f"{SHORT_LABELS[key]}{shown}" if key in SHORT_LABELS else f"{key}_{_UNSAFE.sub('_', shown)}"
    if isinstance(value, dict) and value and all(isinstance(v, (str, bool, int, float)) for v in value.values()):
        return "_".join([key, *(f"{k}_{_UNSAFE.sub('_', str(v))}" for k, v in value.items())])
    return f"{key}_{_digest(value)}"


def _expert_options(where: str, values: Any, document: dict[str, Any], recipe: Recipe) -> list[Option]:
    """Subsets of the starting recipe's experts, each an Option setting ``experts`` to those experts."""
    names = [e.name for e in recipe.experts]
    if isinstance(values, dict):
        if set(values) != {"choose"} or not isinstance(values["choose"], int) or isinstance(values["choose"], bool) \
                or values["choose"] < 1:
            raise RecipeError(f"{values!r} is not a subset rule", where,
                              "write experts: {choose: k} with k >= 1, or a list of subsets of expert names")
        k = values["choose"]
        if k > len(names):
            raise RecipeError(f"choose {k} of the starting recipe's {len(names)} experts: there are not that many",
                              where, f"choose at most {len(names)}")
        _check_count(where, f"choose {k} of {len(names)} experts makes", math.comb(len(names), k))
        subsets = [list(c) for c in itertools.combinations(range(len(names)), k)]
    elif isinstance(values, list):
        if not values:
            raise RecipeError("experts lists no subset", where, "give at least one subset, or leave experts out")
        subsets = [_subset(where, item, names) for item in values]
    else:
        raise RecipeError(f"{values!r} is not a list of subsets", where,
                          "write experts: {choose: k}, or experts: [[name, name], [name, name]]")
    short = _short_names(names)
    return [Option(EXPERTS_KEY, [names[i] for i in subset], ".".join(short[i] for i in subset),
                   _setter([EXPERTS_KEY], [document[EXPERTS_KEY][i] for i in subset])) for subset in subsets]


def _subset(where: str, item: Any, names: list[str]) -> list[int]:
    """One subset as indices into the starting recipe's experts, in the order given."""
    if not isinstance(item, list) or not item:
        raise RecipeError(f"{item!r} is not a non-empty list of experts", where,
                          f"each subset lists expert names ({', '.join(names)}) or 0-based indices")
    indices = []
    for entry in item:
        if isinstance(entry, int) and not isinstance(entry, bool) and 0 <= entry < len(names):
            indices.append(entry)
        elif isinstance(entry, str) and entry in names:
            indices.append(names.index(entry))
        else:
            raise RecipeError(f"{entry!r} is not one of the starting recipe's experts", where,
                              f"use an expert name ({', '.join(names)}) or an index below {len(names)}")
    if len(set(indices)) != len(indices):
        raise RecipeError(f"the subset {item!r} names an expert twice", where, "name each expert once")
    return indices


def _short_names(names: list[str]) -> list[str]:
    """Expert names without the prefix they all share (``expert_code`` -> ``code``), safe in a merge name."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    cut = max(prefix.rfind(c) for c in "_.-") + 1 if prefix else 0
    return [_UNSAFE.sub("_", n[cut:] or n) for n in names]


def _names(search: str, combos: list[tuple[Option, ...]]) -> list[str]:
    """Readable names; a name that is not a valid merge name, or is not unique, is the search's name and a
    digest of the settings instead (stable too)."""
    readable = ["-".join([search, *(o.label for o in combo)]) for combo in combos]
    counts = {n: readable.count(n) for n in readable}
    out = []
    for name, combo in zip(readable, combos):
        if counts[name] > 1 or not is_merge_name(name) or PERIODIC_END.search(name):
            name = f"{search}-{_digest({o.key: o.setting for o in combo})}"
        check_merge_name(name, f"searches: {search}", RecipeError)
        out.append(name)
    return out


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


def write_candidate_recipe(document: Mapping[str, Any], out: Path) -> None:
    """The candidate's recipe file: the validate rule reads it as it reads any merge's recipe."""
    write_text(out, yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True))
