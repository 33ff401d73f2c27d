"""YAML documents a user supplies (recipes, published recipes, the workflow config), read in bounded memory.

YAML aliases let a few hundred bytes stand for gigabytes ("billion laughs": each level lists the one
below ten times). PyYAML builds such a document cheaply, sharing one object per anchor, but everything
that walks it afterwards (schema validation, a message quoting a value, JSON output) expands it. So a
document is measured as it would be expanded, without expanding it (each shared object is sized once),
and refused past a bound far above any real recipe or config.
"""

from __future__ import annotations

from typing import Any

import yaml

from moeforge.errors import MoeforgeError

#: Values (scalars, lists and mappings) a document may hold once its aliases are expanded. A published
#: recipe with 64 experts of 100 prompts each holds about 20 thousand.
MAX_EXPANDED_VALUES = 1_000_000

#: libyaml's parser where PyYAML was built with it (the wheels are).
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_problem(exc: yaml.YAMLError, first_line: int = 1) -> str:
    """PyYAML's message in one line, with the place counted from 1 as editors do; ``first_line`` is where
    the document starts in its file (a README's YAML block starts part-way down)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    return f"line {mark.line + first_line} column {mark.column + 1}: {problem}"


def expanded_size(document: Any, limit: int = MAX_EXPANDED_VALUES) -> int:
    """How many values ``document`` holds with every alias expanded, counted up to just past ``limit``.

    Each object is sized once (memoised by identity), so the count costs the document's size as parsed,
    not as expanded. A structure that contains itself (``&a [*a]``) has no finite expansion: ValueError.
    """
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(value: Any) -> int:
        if not isinstance(value, (list, dict)):
            return 1
        key = id(value)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise ValueError("an alias refers to a value that contains it")
        open_.add(key)
        children = value.values() if isinstance(value, dict) else value
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        open_.discard(key)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(document)


def check_bounded(document: Any, where: str, error: type[MoeforgeError]) -> None:
    """Refuse a document that expands past MAX_EXPANDED_VALUES, or contains itself, before anything walks it."""
    try:
        count = expanded_size(document)
    except ValueError as exc:
        raise error(f"{exc}, so it never ends when expanded", where,
                    "remove the self-referring alias (*name inside the value &name marks)") from None
    except RecursionError:
        raise error("nested too deeply to read", where, "flatten the document") from None
    if count > MAX_EXPANDED_VALUES:
        raise error(f"its YAML aliases expand to more than {MAX_EXPANDED_VALUES:,} values", where,
                    "write the values out, or use fewer nested aliases (*name); a recipe or config needs far "
                    "fewer") from None


def parse_yaml(text: str, where: str, error: type[MoeforgeError], first_line: int = 1) -> Any:
    """One YAML document, refused as one ``error`` naming ``where`` when it is malformed or unbounded."""
    try:
        document = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError as exc:
        raise error(f"not valid YAML: {yaml_problem(exc, first_line)}", where, "fix the YAML syntax") from None
    except RecursionError:
        raise error("nested too deeply to read", where, "flatten the document") from None
    check_bounded(document, where, error)
    return document
