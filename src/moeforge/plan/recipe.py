"""The recipe: a mergekit-moe YAML file, as published, plus moeforge's own keys.

Published mergekit-moe recipes must run unchanged, so every mergekit-moe key keeps its name,
meaning and default. Unlike mergekit-moe, an unknown key is an error (a typo such as
``experts_per_tok`` would otherwise silently fall back to a default), and every contradiction
that can be seen in the recipe alone is reported here, before any model is fetched.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from moeforge.errors import RecipeError
from moeforge.io.files import read_text
from moeforge.io.schema import (
    first_and_more,
    integral_floats_as_int,
    nonfinite_problems,
    package_schema,
    schema_errors,
)
from moeforge.io.yaml_doc import parse_yaml
from moeforge.plan.templates import output_candidates

PROMPTLESS_GATE_MODES = ("random", "uniform_random")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ExpertSpec:
    """One expert (or shared expert) as the recipe states it."""

    source_model: str
    name: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None
    train_texts: tuple[str, ...] = ()


#: Per-method defaults of the settings the recipe leaves unset: ``layerwise`` converges in a few hundred
#: full-batch steps per layer (its loss moves by under 5% after step 100 on the demo) and holds its tokens'
#: router inputs, so it reads fewer; ``end_to_end`` takes one small batch per step and streams its tokens, and
#: gains from more of both, and from windows as long as the context the model is evaluated at (the routers then
#: see the hidden states of late positions too; 8 windows of 128 tokens hold the tokens, and so the memory, of 16
#: of 64), at half the learning rate, which keeps it from routing text of another style more confidently than
#: prompt routers do; ``label_smoothing`` does that for the layerwise classifier, and means nothing to
#: next-token training (docs/training.md).
METHOD_DEFAULTS = {"layerwise": {"steps": 200, "tokens_per_expert": 8192, "label_smoothing": 0.3},
                   "end_to_end": {"steps": 800, "tokens_per_expert": 65536, "label_smoothing": 0.0,
                                  "learning_rate": 0.005, "seq_len": 128, "batch_size": 8}}


@dataclass(frozen=True)
class RouterTraining:
    """moeforge's ``router_training:`` settings, every default explicit (docs/recipe.md says what each does).

    ``steps`` and ``learning_rate`` are per layer for ``layerwise`` (full-batch steps on the layer's router
    inputs) and for the whole model for ``end_to_end`` (one batch of ``batch_size`` windows per step), so an
    unset ``steps``, ``learning_rate``, ``tokens_per_expert``, ``seq_len`` and ``batch_size`` default per method
    (``METHOD_DEFAULTS``).
    ``tokens_per_expert`` bounds what is read of each expert's texts; a ``heldout_fraction`` of its windows
    is kept out of training to measure routing accuracy.
    """

    method: str = "layerwise"
    steps: int = 200
    learning_rate: float = 0.01
    label_smoothing: float = 0.3
    seed: int = 0
    tokens_per_expert: int = 8192
    seq_len: int = 64
    batch_size: int = 16
    heldout_fraction: float = 0.1
    device: str = "cpu"
    memory_gb: float | None = None


@dataclass(frozen=True)
class Recipe:
    """A validated recipe with every default made explicit."""

    base_model: str
    experts: tuple[ExpertSpec, ...]
    shared_experts: tuple[ExpertSpec, ...] = ()
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    architecture: str | None = None
    seed: int = 0
    token_reduction: str = "last"
    prompt_template: str = "raw"
    router_scale: float | None = None
    gate_batch_size: int = 8
    gate_device: str = "cpu"
    strict_gates: bool = False
    rope_scaling: str = "preserve"
    allow_rope_mismatch: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: str = "keep"
    shared_gate: str = "prompts"
    trust_remote_code: bool = False
    smoke_prompts: tuple[str, ...] = ()
    max_new_tokens: int | None = None
    router_training: RouterTraining | None = None
    source_models: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        refs = [self.base_model, *(e.source_model for e in self.experts + self.shared_experts)]
        object.__setattr__(self, "source_models", tuple(dict.fromkeys(refs)))

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (all defaults explicit), as recorded in plan.json and the lock: JSON types only
        (lists, not tuples), so the model card's YAML and the lock write it as they read it."""
        data = _as_lists(asdict(self))
        data.pop("source_models")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """The Recipe that ``to_dict`` wrote (plan.json checks its form against the plan schema first)."""
        fields = {k: v for k, v in data.items() if k not in ("experts", "shared_experts")}
        fields["smoke_prompts"] = tuple(fields.get("smoke_prompts", ()))
        if fields.get("router_training") is not None:
            fields["router_training"] = RouterTraining(**fields["router_training"])
        return cls(experts=_typed_experts(data["experts"]), shared_experts=_typed_experts(data["shared_experts"]),
                   **fields)

    def shared_gate_group(self) -> ExpertSpec | None:
        """The shared experts as their gate sees them, or None when the gate is not computed from prompts.

        The N shared experts become one fused shared MLP with one gate, routed by all their prompts (in
        recipe order); ``shared_gate: always`` writes no gate row.
        """
        if not self.shared_experts or self.shared_gate != "prompts":
            return None
        return ExpertSpec(source_model=", ".join(e.source_model for e in self.shared_experts), name="shared",
                          positive_prompts=tuple(p for e in self.shared_experts for p in e.positive_prompts),
                          negative_prompts=tuple(p for e in self.shared_experts for p in e.negative_prompts),
                          train_texts=tuple(t for e in self.shared_experts for t in e.train_texts))

    def gate_groups(self) -> tuple[ExpertSpec, ...]:
        """The gate's rows in order: the routed experts, then the fused shared group (when it has a gate)."""
        shared = self.shared_gate_group()
        return self.experts + ((shared,) if shared else ())


def _as_lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


def _typed_experts(items: list[Mapping[str, Any]]) -> tuple[ExpertSpec, ...]:
    return tuple(ExpertSpec(**{**e, "positive_prompts": tuple(e["positive_prompts"]),
                               "negative_prompts": tuple(e["negative_prompts"]),
                               "train_texts": tuple(e.get("train_texts", ()))}) for e in items)


#: Every gate mode, in the schema's order: the schema is the one place that lists them.
GATE_MODES: tuple[str, ...] = tuple(package_schema("recipe")["properties"]["gate_mode"]["enum"])


def _expert_name(ref: str) -> str:
    base = ref.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "expert"


def _experts(raw: list[Mapping[str, Any]]) -> tuple[ExpertSpec, ...]:
    """Typed experts with unique names (a model used twice gets -2, -3...)."""
    out: list[ExpertSpec] = []
    used: dict[str, int] = {}
    for item in raw:
        name = item.get("name") or _expert_name(item["source_model"])
        used[name] = used.get(name, 0) + 1
        if used[name] > 1:
            name = f"{name}-{used[name]}"
        out.append(ExpertSpec(
            source_model=item["source_model"], name=name,
            positive_prompts=tuple(item.get("positive_prompts") or ()),
            negative_prompts=tuple(item.get("negative_prompts") or ()),
            noise_scale=item.get("noise_scale"), residual_scale=item.get("residual_scale"),
            train_texts=tuple(item.get("train_texts") or ()),
        ))
    return tuple(out)


def _normalise_tie(value: Any) -> str:
    return {True: "keep", False: "untie"}.get(value, value) if isinstance(value, bool) else value


#: Keys of mergekit's other merge configs that recipes for mergekit-moe sometimes carry, which mergekit-moe
#: ignores: the output always has the base's tokenizer and chat template.
TOKENIZER_KEYS = ("tokenizer_source", "tokenizer", "chat_template")


def _refuse_tokenizer_keys(data: Mapping[str, Any], source: str) -> None:
    """Say what such a key would mean here, instead of a did-you-mean to an unrelated key."""
    given = [k for k in TOKENIZER_KEYS if k in data]
    if given:
        raise RecipeError(f"{given[0]}: moeforge, like mergekit-moe, always gives the merged model the base model's "
                          "tokenizer and chat template (every expert must share the base's vocabulary)", source,
                          f"remove {' and '.join(given)} from the recipe; to use another tokenizer, use a base model "
                          "that has it")


def without_nulls(document: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe with its null keys (and its experts' null keys) left out.

    mergekit-moe reads ``key: null`` as an unset key, and recipes written for it (or dumped from its
    config class) carry them (``negative_prompts: null``, ``shared_experts: null``); every moeforge key
    that may be null defaults to None, so leaving them out changes nothing else.
    """
    def item(value: Any) -> Any:
        return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value

    out = {k: v for k, v in document.items() if v is not None}
    for key in ("experts", "shared_experts"):
        if isinstance(out.get(key), list):
            out[key] = [item(value) for value in out[key]]
    return out


#: What to do about a key of the wrong type or value, where the document is a recipe file someone wrote.
RECIPE_FIX = "fix the recipe (docs/recipe.md lists every key and its type)"


def parse_recipe(data: Any, source: str = "recipe", fix: str = RECIPE_FIX) -> Recipe:
    """Validate a recipe document (already parsed YAML) and return it typed.

    ``fix`` says what to change for a key of the wrong type or value: a search's candidate is a recipe no one
    wrote, whose bad value came from the search's grid."""
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping with base_model and experts", source,
                          "see config/recipes/ for examples")
    data = without_nulls(data)
    _refuse_tokenizer_keys(data, source)
    problems = schema_errors(data, package_schema("recipe")) + nonfinite_problems(data)
    if problems:
        raise RecipeError(first_and_more(problems), source, fix)
    data = integral_floats_as_int(data, package_schema("recipe"))
    kwargs = {k: v for k, v in data.items() if k not in ("experts", "shared_experts")}
    for key in ("smoke_prompts",):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    if kwargs.get("dtype") is not None:
        kwargs["dtype"] = DTYPE_ALIASES.get(kwargs["dtype"], kwargs["dtype"])
    if "tie_word_embeddings" in kwargs:
        kwargs["tie_word_embeddings"] = _normalise_tie(kwargs["tie_word_embeddings"])
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("dtype", "router_scale")}
    if "router_training" in kwargs:
        settings = kwargs["router_training"]
        method = settings.get("method", RouterTraining.method)
        kwargs["router_training"] = RouterTraining(**{**METHOD_DEFAULTS[method], **settings})
    recipe = Recipe(experts=_experts(data["experts"]), shared_experts=_experts(data.get("shared_experts") or []),
                    **kwargs)
    check_recipe(recipe, source)
    return recipe


def check_recipe(recipe: Recipe, source: str) -> None:
    """Contradictions visible in the recipe alone: the one place that checks how its keys go together (each
    key's own type and allowed values are the recipe schema's)."""
    n = len(recipe.experts)
    if recipe.experts_per_token > n:
        raise RecipeError(
            f"experts_per_token is {recipe.experts_per_token} but the recipe has only {n} expert(s)",
            f"{source}: experts_per_token", f"set experts_per_token to at most {n} or add experts")
    if recipe.gate_mode not in PROMPTLESS_GATE_MODES:
        _check_positive_prompts(recipe, source)
        _check_distinct_prompts(recipe, source)
    if recipe.architecture is not None:
        output_candidates(recipe.architecture, f"{source}: architecture")
    if recipe.token_reduction != "last" and recipe.gate_mode != "router_input":
        raise RecipeError(f"token_reduction only applies to gate_mode router_input, not {recipe.gate_mode!r}",
                          f"{source}: token_reduction", "remove token_reduction or use gate_mode router_input")
    if recipe.router_scale is not None:
        _check_router_scale(recipe, source)
    if recipe.router_training is not None:
        _check_train_texts(recipe, source)
        _check_label_smoothing(recipe.router_training, source)
        _check_something_to_train(recipe, source)
    _refuse_unused_train_texts(recipe, source)


def _check_positive_prompts(recipe: Recipe, source: str) -> None:
    """A prompt gate mode needs each expert's prompts (and the shared experts', when their gate reads prompts)."""
    groups = [("experts", i, e) for i, e in enumerate(recipe.experts)]
    if recipe.shared_gate == "prompts":
        groups += [("shared_experts", i, e) for i, e in enumerate(recipe.shared_experts)]
    for key, i, expert in groups:
        if not expert.positive_prompts:
            raise RecipeError(
                f"gate_mode {recipe.gate_mode!r} computes routers from prompts, but {expert.name!r} "
                f"({expert.source_model}) has no positive_prompts", f"{source}: {key}[{i}] ({expert.name})",
                "add positive_prompts to every expert, or use a gate_mode that needs none "
                f"({', '.join(PROMPTLESS_GATE_MODES)})")


def _trained_groups(recipe: Recipe) -> list[tuple[str, int, ExpertSpec]]:
    """The experts whose texts train a gate row: every routed expert, and the shared experts when their gate
    has a row (``shared_gate: prompts``)."""
    groups = [("experts", i, e) for i, e in enumerate(recipe.experts)]
    if recipe.shared_gate == "prompts":
        groups += [("shared_experts", i, e) for i, e in enumerate(recipe.shared_experts)]
    return groups


def _check_train_texts(recipe: Recipe, source: str) -> None:
    """Router training learns each gate row from its expert's texts: an expert without any has no row to learn.
    Each text is an input of the workflow's jobs (an edit retrains), and Snakemake reads braces in an input's
    path as a wildcard, so a path with one is refused here rather than as Snakemake's WildcardError."""
    for key, i, expert in _trained_groups(recipe):
        if not expert.train_texts:
            raise RecipeError(
                f"router_training is on, but {expert.name!r} ({expert.source_model}) has no train_texts",
                f"{source}: {key}[{i}] ({expert.name})",
                "give every expert train_texts: [paths of UTF-8 text of its domain], or remove router_training")
        for path in expert.train_texts:
            if "{" in path or "}" in path:
                raise RecipeError(f"train text {path!r} has a brace in its path, which Snakemake reads as a wildcard",
                                  f"{source}: {key}[{i}] ({expert.name}): train_texts",
                                  "rename the file (or link to it from a path) without { and }")


def _check_label_smoothing(settings: RouterTraining, source: str) -> None:
    """Label smoothing is the layerwise classifier's; end_to_end trains on next-token loss, which has no labels."""
    if settings.method == "end_to_end" and settings.label_smoothing:
        raise RecipeError("label_smoothing applies to method layerwise, not end_to_end (next-token loss)",
                          f"{source}: router_training.label_smoothing", "remove label_smoothing, or use layerwise")


def _check_something_to_train(recipe: Recipe, source: str) -> None:
    """A router with one row sends every token to its one expert, whatever its weights: training it would learn
    nothing (and report a perfect routing accuracy)."""
    if len(recipe.gate_groups()) < 2:
        raise RecipeError(
            f"router_training with one expert has nothing to learn: {recipe.experts[0].name!r} gets every token "
            "whatever its router's weights", f"{source}: router_training",
            "remove router_training, or give the recipe two or more experts")


def _refuse_unused_train_texts(recipe: Recipe, source: str) -> None:
    """train_texts that train no gate row would be read by nothing: without router_training most likely it was
    forgotten; with it, they are a shared expert's whose gate is not computed (``shared_gate: always``)."""
    trained = {id(e) for _, _, e in _trained_groups(recipe)} if recipe.router_training is not None else set()
    experts = [("experts", i, e) for i, e in enumerate(recipe.experts)]
    experts += [("shared_experts", i, e) for i, e in enumerate(recipe.shared_experts)]
    for key, i, expert in experts:
        if not expert.train_texts or id(expert) in trained:
            continue
        where = f"{source}: {key}[{i}] ({expert.name})"
        if recipe.router_training is None:
            raise RecipeError(f"{expert.name!r} has train_texts, but the recipe has no router_training to read them",
                              where, "add router_training: {method: layerwise} (docs/recipe.md), or remove train_texts")
        raise RecipeError(f"{expert.name!r} has train_texts, but shared_gate: {recipe.shared_gate} gives the shared "
                          "experts no gate to train on them", where,
                          "remove its train_texts, or set shared_gate: prompts to train the shared expert's gate")


def _check_router_scale(recipe: Recipe, source: str) -> None:
    """router_scale calibrates the logits' spread across experts on the prompts' router inputs."""
    where = f"{source}: router_scale"
    if recipe.gate_mode in PROMPTLESS_GATE_MODES:
        raise RecipeError(
            f"router_scale is calibrated on the prompts' router inputs; gate_mode {recipe.gate_mode!r} has none",
            where, "remove router_scale, or use a prompt-based gate_mode")
    if len(recipe.experts) < 2:
        raise RecipeError(
            "router_scale needs at least two experts (it calibrates the spread of logits across experts)",
            where, "remove router_scale")


def _check_distinct_prompts(recipe: Recipe, source: str) -> None:
    """mergekit-moe's refusal: if every expert has the same prompts, every router row is the same."""
    prompts = {(e.positive_prompts, e.negative_prompts) for e in recipe.experts}
    if len(recipe.experts) > 1 and len(prompts) == 1:
        raise RecipeError(
            f"all {len(recipe.experts)} experts have identical prompts, so every router row would be the same "
            "and the router could not choose between them", f"{source}: experts",
            "give each expert prompts typical of the inputs it should handle, or use gate_mode random")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a recipe file" if path.is_dir() else "recipe file not found"
        raise RecipeError(what, str(path), "check the recipe path: --config recipe=PATH, or recipe: under merges: in "
                          "your config file")
    text = read_text(path, "", RecipeError, "save the recipe as UTF-8 (editors offer it under 'Save with encoding')")
    return parse_recipe(parse_yaml(text, str(path), RecipeError), str(path))
