"""The Plan: the typed merge plan, and plan.json, its form on disk.

plan.json is the single truth every later rule executes, so it is checked against
``schemas/plan.schema.yaml`` when it is written and again when any job reads it: a file written by
another moeforge version, or edited, is refused with its name, not misread deep inside a job. Every
reader goes through ``read_plan``. No pandas or torch here: the workflow reads plans at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from moeforge.errors import BuildError
from moeforge.io.files import read_json, write_json
from moeforge.io.schema import first_and_more, package_schema, schema_errors
from moeforge.plan.recipe import Recipe

REPLAN_FIX = "delete it and rerun the workflow: the validate step writes it again (an older moeforge wrote it, or it " \
             "was edited)"


@dataclass(frozen=True)
class PlannedExpert:
    """A routed or shared expert: its recipe name, the model's slug and the reference the recipe gave."""

    name: str
    slug: str
    ref: str


@dataclass(frozen=True)
class PlannedSource:
    """One source model: what it is, where it came from (the lock records this), and its roles in the merge."""

    ref: str
    slug: str
    roles: tuple[str, ...]
    family: str
    model_type: str
    kind: str
    resolved_revision: str | None
    content_id: str


@dataclass(frozen=True)
class Plan:
    """Everything decided about a merge from its recipe and its sources' metadata, before any weight is read.

    ``base_params`` are the base config's normalised parameters (moeforge.plan.params); ``window_layers``
    the decoder layers that attend within the recipe's sliding_window; ``shard_keys`` the key of each shard
    read from the sources, which names its file (moeforge.plan.shard_keys); ``shard_bytes`` each shard's output
    bytes and ``layer_bytes`` one decoder layer's (what a layer-streamed job holds at a time): the basis of
    the jobs' resource requests.
    """

    merge: str
    recipe: Recipe
    base: str
    input_family: str
    output_family: str
    num_layers: int
    num_experts: int
    hidden_size: int
    shared_intermediate_size: int | None
    dtype_out: str
    tie_output: bool
    experts: tuple[PlannedExpert, ...]
    shared_experts: tuple[PlannedExpert, ...]
    sources: Mapping[str, PlannedSource]
    base_params: Mapping[str, Any]
    window_layers: tuple[int, ...]
    shards: tuple[str, ...]
    shard_keys: Mapping[str, str]
    shard_bytes: Mapping[str, int]
    layer_bytes: int
    decisions: tuple[Mapping[str, str], ...]
    warnings: tuple[str, ...]

    def with_warnings(self, more: list[str]) -> Plan:
        """The plan with more warnings (a later check's findings) after its own."""
        return replace(self, warnings=(*self.warnings, *more))

    @property
    def total_bytes(self) -> int:
        """The merged model's tensor bytes (every shard's output)."""
        return sum(self.shard_bytes.values())

    def to_dict(self) -> dict[str, Any]:
        """plan.json's content: the fields in order, as JSON types."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "recipe":
                value = value.to_dict()
            elif f.name in ("experts", "shared_experts"):
                value = [_record(e) for e in value]
            elif f.name == "sources":
                value = {slug: _record(s) for slug, s in value.items()}
            elif isinstance(value, tuple):
                value = [dict(v) if isinstance(v, Mapping) else v for v in value]
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """The Plan of a plan.json document that the plan schema accepted."""
        return cls(**{**data, "recipe": Recipe.from_dict(data["recipe"]),
                      "experts": tuple(PlannedExpert(**e) for e in data["experts"]),
                      "shared_experts": tuple(PlannedExpert(**e) for e in data["shared_experts"]),
                      "sources": {slug: PlannedSource(**{**s, "roles": tuple(s["roles"])})
                                  for slug, s in data["sources"].items()},
                      "window_layers": tuple(data["window_layers"]), "shards": tuple(data["shards"]),
                      "decisions": tuple(data["decisions"]), "warnings": tuple(data["warnings"])})


def _record(item: PlannedExpert | PlannedSource) -> dict[str, Any]:
    return {f.name: list(v) if isinstance(v := getattr(item, f.name), tuple) else v for f in fields(item)}


def _check(document: Any, where: str) -> None:
    problems = schema_errors(document, package_schema("plan"))
    if problems:
        raise BuildError(f"not a plan this moeforge can execute: {first_and_more(problems)}", where, REPLAN_FIX)


def write_plan_json(plan: Plan, path: Path) -> None:
    """Write plan.json, checked against the plan schema first (a failure here is a moeforge bug, caught before
    any job executes the plan)."""
    document = plan.to_dict()
    _check(document, f"{path} (as about to be written)")
    write_json(path, document)


def read_plan(path: Path) -> Plan:
    """The Plan in a plan.json, which must match the plan schema: the one way every job reads a plan."""
    path = Path(path)
    document = read_json(path, "", BuildError, REPLAN_FIX)
    _check(document, str(path))
    return Plan.from_dict(document)
