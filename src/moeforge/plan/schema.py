"""JSON Schema validation with messages a user can act on.

jsonschema reports *that* a document is wrong; users need *where* (the key path) and *what
to do* ("experts_per_tok: did you mean experts_per_token?"). This module turns validation
errors into such lines. Schemas are draft 2020-12, as Snakemake 9 expects.
"""

from __future__ import annotations

import difflib
import functools
from importlib import resources
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import yaml

if TYPE_CHECKING:
    import jsonschema

#: libyaml's parser where PyYAML was built with it (the wheels are): about ten times faster.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def package_schema(name: str) -> dict[str, Any]:
    """moeforge's own ``schemas/NAME.schema.yaml``, parsed once per process (callers only read it).

    Every architecture template is validated against one of them: parsed again for each template
    with PyYAML's pure-Python parser, that took a quarter of a second in every job that loads them.
    """
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


def _closest(word: str, choices: Iterable[str]) -> str:
    match = closest(word, choices)
    return f"; did you mean {match!r}?" if match else ""


def _describe(error: jsonschema.ValidationError) -> str:
    where = key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        lines = []
        for key in extra:
            path = key_path([*error.absolute_path, key])
            hint = _closest(key, allowed)
            lines.append(f"{path}: unknown key {key!r}{hint or '; valid keys: ' + ', '.join(allowed)}")
        return "\n".join(lines)
    if error.validator == "enum":
        return (f"{where}: {error.instance!r} is not one of {list(error.validator_value)}"
                f"{_closest(str(error.instance), map(str, error.validator_value))}")
    if error.validator == "required":
        return f"{where}: {error.message}"
    if error.validator == "pattern" and error.absolute_path == error.relative_path and error.path:
        return f"{where}: {error.instance!r} does not match {error.validator_value!r}"
    if error.validator == "oneOf" and error.context:
        from jsonschema.exceptions import best_match

        return _describe(best_match(error.context))
    return f"{where}: {error.message}"


def schema_errors(document: Any, schema: Mapping[str, Any]) -> list[str]:
    """Every problem of `document` under `schema`, one line each, in document order.

    jsonschema is imported here, not with the module: the gates and smoke-test jobs import recipe
    constants through this module and never validate, and its import costs them 0.15 s each.
    """
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    return [_describe(e) for e in errors]
