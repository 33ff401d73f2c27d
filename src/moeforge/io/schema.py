"""JSON Schema validation with messages a user can act on.

jsonschema reports *that* a document is wrong; users need *where* (the key path) and *what
to do* ("experts_per_tok: did you mean experts_per_token?"). This module turns validation
errors into such lines. Schemas are draft 2020-12, as Snakemake 9 expects.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from importlib import resources
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import yaml

from moeforge.io.yaml_doc import YAML_LOADER

if TYPE_CHECKING:
    import jsonschema


@functools.cache
def package_schema(name: str) -> dict[str, Any]:
    """moeforge's own ``schemas/NAME.schema.yaml``, parsed once per process (callers only read it):
    every architecture template is validated against one of them."""
    return yaml.load(resources.files("moeforge").joinpath(f"schemas/{name}.schema.yaml").read_text(),
                     Loader=YAML_LOADER)


def key_path(path: Iterable[Any]) -> str:
    """`experts[1].source_model` style path of a value inside a document."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def closest(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The valid choice a mistyped word most likely meant, if any is close enough."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest valid choice, or nothing when none is close."""
    match = closest(word, choices)
    return f"; did you mean {match!r}?" if match else ""


#: A number in exponent form that YAML 1.2 and JSON read as a number, but PyYAML (YAML 1.1, which wants a decimal
#: point and a signed exponent) reads as text: ``1e-3``, ``2E9``, ``1.0e9``.
_EXPONENT_TEXT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def _as_yaml_number(text: str, integer: bool) -> str:
    """How to write the number ``text`` means so that YAML 1.1 reads it as one: a decimal point, and a signed
    exponent (Python's repr has the sign)."""
    value = float(text)
    if integer and value.is_integer():
        return str(int(value))
    mantissa, _, exponent = repr(value).partition("e")
    return f"{mantissa if '.' in mantissa else mantissa + '.0'}{'e' + exponent if exponent else ''}"


def _number_as_text(error: jsonschema.ValidationError) -> str | None:
    """The message for a number written ``1e-3``, which YAML reads as text: the plain type error reads as if the
    value were not a number at all."""
    types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
    if not (isinstance(error.instance, str) and _EXPONENT_TEXT.fullmatch(error.instance)
            and {"number", "integer"} & set(types)):
        return None
    return (f"{key_path(error.absolute_path)}: {error.instance!r} is read as text, not a number (YAML reads an "
            f"exponent without both a decimal point and a sign as text); write {_as_yaml_number(error.instance, 'number' not in types)}")


def _describe(error: jsonschema.ValidationError) -> str:
    where = key_path(error.absolute_path)
    if error.validator == "type" and (number := _number_as_text(error)):
        return number
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        lines = []
        for key in extra:
            path = key_path([*error.absolute_path, key])
            hint = did_you_mean(key, allowed)
            lines.append(f"{path}: unknown key {key!r}{hint or '; valid keys: ' + ', '.join(allowed)}")
        return "\n".join(lines)
    if error.validator == "enum":
        return (f"{where}: {error.instance!r} is not one of {list(error.validator_value)}"
                f"{did_you_mean(str(error.instance), map(str, error.validator_value))}")
    if error.validator == "required":
        return f"{where}: {error.message}"
    if error.validator == "pattern" and error.absolute_path == error.relative_path and error.path:
        return f"{where}: {error.instance!r} does not match {error.validator_value!r}"
    if error.validator == "oneOf" and all(set(branch) == {"required"} for branch in error.validator_value):
        names = [name for branch in error.validator_value for name in branch["required"]]
        given = [name for name in names if isinstance(error.instance, dict) and name in error.instance]
        return f"{where}: give exactly one of {', '.join(names)} (given: {', '.join(given) or 'none'})"
    if error.validator == "oneOf" and error.context:
        from jsonschema.exceptions import best_match

        return _describe(best_match(error.context))
    return f"{where}: {error.message}"


def first_and_more(problems: list[str]) -> str:
    """The first problem, then how many more and each of them: the message of a document with ``problems``."""
    more = "".join(f"\n  {p}" for p in problems[1:])
    return problems[0] + (f"\n  ({len(problems) - 1} more problem(s) below){more}" if more else "")


def schema_errors(document: Any, schema: Mapping[str, Any]) -> list[str]:
    """Every problem of `document` under `schema`, one line each, in document order.

    jsonschema is imported here, not with the module: the gates and smoke-test jobs import recipe
    constants through this module and never validate, and a job imports only what it uses.
    """
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    return [_describe(e) for e in errors]


def integral_floats_as_int(document: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> Any:
    """``document`` with every integral float (``2.0``) that the schema types as an integer made an int.

    JSON Schema counts 2.0 as an integer, and mergekit-moe's recipe parser takes it, so a recipe may
    say ``experts_per_token: 2.0``; but the code behind the schema (transformers' config classes among
    it) refuses a float, and would do so only in a job after the weights are read.
    """
    root = schema if root is None else root
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    types = schema.get("type", [])
    if isinstance(document, float) and document.is_integer() and "integer" in (types if isinstance(types, list) else [types]):
        return int(document)
    if isinstance(document, dict):
        extra = schema.get("additionalProperties")
        properties = schema.get("properties", {})
        other = extra if isinstance(extra, dict) else {}
        return {key: integral_floats_as_int(value, properties.get(key, other), root) for key, value in document.items()}
    if isinstance(document, list) and isinstance(schema.get("items"), dict):
        return [integral_floats_as_int(value, schema["items"], root) for value in document]
    return document


def non_json_problems(document: Any, path: tuple[Any, ...] = ()) -> list[str]:
    """One line for every value that is no JSON value (text, number, boolean, null, list, mapping), by key path.

    YAML reads an unquoted ``2024-01-01`` as a date and ``!!binary`` as bytes; where the schema leaves a
    value's type open (a search's grid takes any recipe value) such a value would reach code that writes
    JSON, and fail there with a Python error instead of one message naming the key.
    """
    if isinstance(document, dict):
        return [line for key, value in document.items() for line in non_json_problems(value, (*path, key))]
    if isinstance(document, (list, tuple)):
        return [line for index, value in enumerate(document) for line in non_json_problems(value, (*path, index))]
    if document is None or isinstance(document, (str, int, float)):
        return []
    return [f"{key_path(path)}: {document!r} is no JSON value (a {type(document).__name__}: YAML reads an unquoted "
            "date as one): quote it"]


def nonfinite_problems(document: Any, path: tuple[Any, ...] = ()) -> list[str]:
    """One line for every NaN or infinity in ``document`` (YAML's ``.nan``, ``.inf``, ``-.inf``), by key path.

    JSON Schema cannot refuse them: every comparison with NaN is false, so ``minimum``/``maximum`` let
    ``.nan`` through, and a NaN scale would only show as a broken model after the weights are read. No key
    of a recipe or the workflow config means anything by a non-finite number, so the whole document is
    walked, whatever the schema says of each key.
    """
    if isinstance(document, float) and not math.isfinite(document):
        return [f"{key_path(path)}: {document!r} is not a finite number"]
    if isinstance(document, dict):
        return [line for key, value in document.items() for line in nonfinite_problems(value, (*path, key))]
    if isinstance(document, (list, tuple)):
        return [line for index, value in enumerate(document) for line in nonfinite_problems(value, (*path, index))]
    return []
