"""The schema check of CI's fast stage: every schema moeforge ships is a valid draft 2020-12 schema
(the draft Snakemake 9's ``validate`` expects), and the config and recipes it ships validate against theirs.

A broken schema otherwise shows up only when a run validates against it; a shipped recipe that no
longer matches its schema, only when a user copies it.

    python tests/check_schemas.py [ROOT]      (default: this repository)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from moeforge.io.schema import YAML_LOADER, key_path, schema_errors

DRAFT = "https://json-schema.org/draft/2020-12/schema"
SCHEMAS = "src/moeforge/schemas"
#: The documents shipped with the workflow (globs under the root), by the schema each must satisfy.
DOCUMENTS = {"config": ["config/config.yaml", "config/search.yaml"], "recipe": ["config/recipes/*.yaml"]}
REPOSITORY = Path(__file__).resolve().parents[1]


def _load(path: Path) -> Any:
    """The YAML document in ``path``; a syntax error names the file, line and column."""
    with open(path, encoding="utf-8") as stream:
        return yaml.load(stream, Loader=YAML_LOADER)


def schema_problems(path: Path) -> list[str]:
    """What keeps ``path`` from being a draft 2020-12 schema: its ``$schema``, else the metaschema's verdict."""
    schema = _load(path)
    if not isinstance(schema, dict) or schema.get("$schema") != DRAFT:
        return [f"{path}: $schema must be {DRAFT!r}"]
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return [f"{path}: {key_path(exc.absolute_path)}: {exc.message}"]
    return []


def problems(root: Path) -> list[str]:
    """Every problem of the schemas under ``root`` and of the documents validated against them."""
    schemas = sorted((root / SCHEMAS).glob("*.yaml"))
    found = [problem for path in schemas for problem in schema_problems(path)]
    if found:
        return found  # documents are only checked against schemas that are sound
    for name, patterns in DOCUMENTS.items():
        schema = _load(root / SCHEMAS / f"{name}.schema.yaml")
        documents = sorted(path for pattern in patterns for path in root.glob(pattern))
        if not documents:
            found.append(f"{root}: no file matches {patterns} (the {name} schema's documents)")
        found += [f"{path}: {problem}" for path in documents for problem in schema_errors(_load(path), schema)]
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else REPOSITORY
    try:
        found = problems(root)
    except yaml.YAMLError as exc:
        found = [str(exc).replace("\n", " ")]
    for line in found:
        print(f"schema check: {line}", file=sys.stderr)
    if found:
        print(f"schema check: {len(found)} problem(s); fix the files named above", file=sys.stderr)
        return 1
    print(f"schema check: the schemas under {root / SCHEMAS} and the documents in {DOCUMENTS} are valid")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
