"""Architecture templates: family knowledge as data.

Input templates (``kind: input``) describe a dense family's tensors by *role* (``q_proj``,
``gate_proj``, ``embed``...), with shapes as integer expressions over the normalised config
parameters. Output templates (``kind: output``) map the same roles to an MoE family's tensor
names and say how its config.json is built. Planning joins the two by role, so a new family is
a new YAML file, not new code.

Every template is validated against ``schemas/architecture.schema.yaml`` and every shape
expression and condition is checked against the known parameter names when it is loaded, so a
misnamed field fails here with the template file and field in the message, never as an
AttributeError deep inside planning.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from moeforge.errors import ModelError, RecipeError, TemplateError
from moeforge.io.schema import closest, did_you_mean, package_schema, schema_errors
from moeforge.io.yaml_doc import YAML_LOADER

INTEGER_PARAMS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
BOOLEAN_PARAMS = ("attention_bias", "qkv_bias", "mlp_bias", "qk_norm", "tied", "untied")
KNOWN_PARAMS = INTEGER_PARAMS + BOOLEAN_PARAMS + ("hidden_act", "rms_norm_eps", "rope_theta")

_ALLOWED_OPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv)
DEFAULT_REQUIRED_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "input_norm", "post_attention_norm")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a dense family, by role."""

    role: str
    name: str
    shape: tuple[str | int, ...]
    when: str | None = None

    def present(self, params: Mapping[str, Any]) -> bool:
        return self.when is None or bool(params[self.when])

    def expected_shape(self, params: Mapping[str, Any]) -> tuple[int, ...]:
        return tuple(evaluate(expr, params) for expr in self.shape)


@dataclass(frozen=True)
class InputFamily:
    """A dense decoder-only family (llama, mistral, qwen2, qwen3)."""

    name: str
    source: str
    model_types: tuple[str, ...]
    default_output: str
    defaults: Mapping[str, Any]
    agree: tuple[str, ...]
    layer_prefix: str
    globals: Mapping[str, TensorSpec]
    attention: Mapping[str, TensorSpec]
    mlp: Mapping[str, TensorSpec]
    #: Where its window applies (``window_layers`` in schemas/architecture.schema.yaml).
    window_layers: str = "all"

    def layer_name(self, layer: int, spec: TensorSpec) -> str:
        return self.layer_prefix.format(layer=layer) + spec.name


@dataclass(frozen=True)
class FusedLayout:
    """How transformers 5.x holds some classic tensors in memory (for the class check)."""

    target: str
    sources: tuple[str, ...]
    op: str


@dataclass(frozen=True)
class OutputFamily:
    """An MoE family (mixtral, qwen2_moe, qwen3_moe): role -> on-disk name, config recipe."""

    name: str
    source: str
    aliases: tuple[str, ...]
    model_type: str
    architectures: tuple[str, ...]
    layer_prefix: str
    globals: Mapping[str, str]
    attention: Mapping[str, str]
    router: str
    experts: Mapping[str, str]
    shared_expert: Mapping[str, str]
    shared_expert_gate: str | None
    zero_fill: Mapping[str, tuple[str | int, ...]]
    required_attention: tuple[str, ...]
    config: Mapping[str, Any]
    in_memory_5x: tuple[FusedLayout, ...]
    #: Where its window applies (``window_layers`` in schemas/architecture.schema.yaml).
    window_layers: str = "all"

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a recipe's ``architecture`` may give it (a prefix of any, in any case)."""
        return (self.name, *self.aliases)

    def layer_name(self, layer: int, name: str, expert: int | None = None) -> str:
        full = self.layer_prefix.format(layer=layer) + name
        return full if expert is None else full.replace("{expert}", str(expert))


def evaluate(expr: str | int, params: Mapping[str, Any]) -> int:
    """Evaluate a checked shape expression against normalised parameters."""
    if isinstance(expr, int):
        return expr
    return _eval_node(ast.parse(expr, mode="eval").body, params)


def _eval_node(node: ast.AST, params: Mapping[str, Any]) -> int:
    if isinstance(node, ast.Constant):
        return int(node.value)
    if isinstance(node, ast.Name):
        return int(params[node.id])
    if isinstance(node, ast.BinOp):
        left, right = _eval_node(node.left, params), _eval_node(node.right, params)
        ops = {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}
        return ops[type(node.op)] if type(node.op) in ops else left // right
    raise ValueError(f"unsupported expression node {type(node).__name__}")


def _check_expr(expr: str | int, where: str) -> None:
    """Reject anything but integer arithmetic over known parameter names."""
    if isinstance(expr, int):
        return
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise TemplateError(f"shape expression {expr!r} is not valid: {exc.msg}", where,
                            "write integer arithmetic over config parameters") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in INTEGER_PARAMS:
            raise TemplateError(
                f"unknown parameter {node.id!r} in shape expression {expr!r}", where,
                _suggest(node.id, INTEGER_PARAMS))
        allowed = (ast.Expression, ast.BinOp, ast.Name, ast.Constant, ast.Load) + _ALLOWED_OPS
        if not isinstance(node, allowed):
            raise TemplateError(f"shape expression {expr!r} uses {type(node).__name__}", where,
                                "only + - * // over config parameters are allowed")


def _suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    match = closest(word, choices)
    return f"did you mean {match!r}?" if match else f"known: {', '.join(choices)}"


def _tensor_map(raw: Mapping[str, Any], source: str, section: str) -> dict[str, TensorSpec]:
    out: dict[str, TensorSpec] = {}
    for role, entry in raw.items():
        where = f"{source}: {section}.{role}"
        for expr in entry["shape"]:
            _check_expr(expr, where)
        when = entry.get("when")
        if when is not None and when not in BOOLEAN_PARAMS:
            raise TemplateError(f"unknown condition {when!r}", where, _suggest(when, BOOLEAN_PARAMS))
        out[role] = TensorSpec(role, entry["name"], tuple(entry["shape"]), when)
    return out


def _deep_merge(parent: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Child keys win; a ``null`` entry inside a mapping removes the inherited entry."""
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {k: v for k, v in _deep_merge(merged[key], value).items() if v is not None}
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=YAML_LOADER)
    except yaml.YAMLError as exc:
        raise TemplateError(f"not valid YAML: {exc}", str(path), "fix the template's syntax") from None
    if not isinstance(data, dict):
        raise TemplateError("a template must be a mapping", str(path), "see schemas/architecture.schema.yaml")
    return data


def _resolve(path: Path, directory: Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    raw = _read_yaml(path)
    parent_name = raw.get("extends")
    if parent_name is None:
        return raw
    parent_path = directory / f"{parent_name}.yaml"
    if parent_name in seen or not parent_path.is_file():
        raise TemplateError(f"extends {parent_name!r}, which is missing or circular", f"{path}: extends",
                            "name an existing template in the same directory")
    parent = _resolve(parent_path, directory, seen + (parent_name,))
    merged = _deep_merge({k: v for k, v in parent.items() if k not in ("name", "description")}, raw)
    merged.pop("extends")
    return merged


def load_template(path: Path) -> InputFamily | OutputFamily:
    """Load, resolve ``extends``, validate and type one template file."""
    data = _resolve(path, path.parent)
    problems = schema_errors(data, package_schema("architecture"))
    if problems:
        raise TemplateError(problems[0], str(path), "see schemas/architecture.schema.yaml")
    source = str(path)
    if data["kind"] == "input":
        unknown = [p for p in list(data["agree"]) + list(data["defaults"]) if p not in KNOWN_PARAMS]
        if unknown:
            raise TemplateError(f"unknown parameter {unknown[0]!r}", f"{source}: agree/defaults",
                                _suggest(unknown[0], KNOWN_PARAMS))
        return InputFamily(
            name=data["name"], source=source, model_types=tuple(data["model_types"]),
            default_output=data["default_output"],
            defaults=dict(data["defaults"]), agree=tuple(data["agree"]),
            layer_prefix=data["layer_prefix"],
            globals=_tensor_map(data["globals"], source, "globals"),
            attention=_tensor_map(data["attention"], source, "attention"),
            mlp=_tensor_map(data["mlp"], source, "mlp"),
            window_layers=data.get("window_layers", "all"),
        )
    return _output_family(data, source)


def _output_family(data: Mapping[str, Any], source: str) -> OutputFamily:
    for role, name in data["experts"].items():
        if "{expert}" not in name:
            raise TemplateError(f"expert tensor name {name!r} has no {{expert}} placeholder",
                                f"{source}: experts.{role}", "write e.g. mlp.experts.{expert}.gate_proj.weight")
    fused = tuple(FusedLayout(f["target"], tuple(f["sources"]), f["op"]) for f in data.get("in_memory_5x", ()))
    zero_fill = {role: tuple(shape) for role, shape in (data.get("zero_fill") or {}).items()}
    for role, shape in zero_fill.items():
        if role not in data["attention"]:
            raise TemplateError(f"zero_fill role {role!r} is not an attention role", f"{source}: zero_fill.{role}",
                                _suggest(role, list(data["attention"])))
        for expr in shape:
            _check_expr(expr, f"{source}: zero_fill.{role}")
    required = tuple(data.get("required_attention") or DEFAULT_REQUIRED_ATTENTION)
    unknown = [r for r in required if r not in data["attention"]]
    if unknown:
        raise TemplateError(f"required role {unknown[0]!r} is not an attention role", f"{source}: required_attention",
                            _suggest(unknown[0], list(data["attention"])))
    return OutputFamily(
        name=data["name"], source=source, aliases=tuple(data["aliases"]), model_type=data["model_type"],
        architectures=tuple(data["architectures"]), layer_prefix=data["layer_prefix"],
        globals=dict(data["globals"]), attention=dict(data["attention"]), router=data["router"],
        experts=dict(data["experts"]), shared_expert=dict(data.get("shared_expert") or {}),
        shared_expert_gate=data.get("shared_expert_gate"), zero_fill=zero_fill, required_attention=required,
        config=dict(data["config"]),
        in_memory_5x=fused, window_layers=data.get("window_layers", "all"),
    )


def _builtin_dir() -> Path:
    return Path(str(resources.files("moeforge").joinpath("architectures")))


@functools.cache
def load_all(directory: Path | None = None) -> tuple[dict[str, InputFamily], dict[str, OutputFamily]]:
    """All templates of a directory (the built-in ones by default), split by kind."""
    inputs: dict[str, InputFamily] = {}
    outputs: dict[str, OutputFamily] = {}
    for path in sorted((directory or _builtin_dir()).glob("*.yaml")):
        template = load_template(path)
        (inputs if isinstance(template, InputFamily) else outputs)[template.name] = template
    return inputs, outputs


def input_family_for(model_type: str, where: str) -> InputFamily:
    """The input family whose template lists this model_type."""
    inputs, _ = load_all()
    for family in inputs.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in inputs.values() for t in f.model_types)
    raise ModelError(
        f"model_type {model_type!r} is not supported", where,
        f"use a model of a supported type: {', '.join(known)}{did_you_mean(model_type, known)}",
    )


def output_family_for(name: str) -> OutputFamily:
    """The output family of this exact name (as plan.json records it)."""
    _, outputs = load_all()
    if name not in outputs:
        raise TemplateError(f"no output architecture template named {name!r}", "architectures/",
                            f"use one of: {', '.join(outputs)}")
    return outputs[name]


def output_candidates(architecture: str, where: str = "recipe: architecture") -> tuple[OutputFamily, ...]:
    """The output families a recipe's ``architecture`` names, read as mergekit-moe reads it: a case-insensitive
    prefix of any of a family's names (its aliases hold mergekit-moe's own, "Mixtral", "Qwen MoE", "Qwen3 MoE"),
    in mergekit-moe's order (the templates' file order). ``qwen`` names both Qwen MoE families; the base decides.
    """
    _, outputs = load_all()
    wanted = architecture.strip().lower()
    found = tuple(f for f in outputs.values() if wanted and any(n.lower().startswith(wanted) for n in f.names))
    if not found:
        names = [f"{f.name} ({', '.join(a for a in f.aliases if a != f.name)})" for f in outputs.values()]
        raise RecipeError(f"architecture {architecture!r} names no supported output architecture", where,
                          f"use one of: {'; '.join(names)}, or a prefix of one, in any case")
    return found


def choose_output(architecture: str | None, base: InputFamily) -> OutputFamily:
    """The output family of a merge: the base's default unless the recipe names one; of the families the recipe's
    ``architecture`` names, the base's default if it is among them, else the first (as mergekit-moe picks the
    first that supports the base)."""
    if not architecture:
        return output_family_for(base.default_output)
    candidates = output_candidates(architecture)
    return next((f for f in candidates if f.name == base.default_output), candidates[0])
