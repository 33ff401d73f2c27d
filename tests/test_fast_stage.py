"""CI's fast stage (.ci/run): the workflow lint check and the schema check pass on this repository and
fail, naming the file and the problem, on a workflow or a schema or document that is wrong."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[1]

RULE = """
rule make:
    output:
        "out.txt",
{log}    shell:
        "echo made > {{output}}"
"""


def _check(script: str, *args: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPOSITORY / "tests" / script), *map(str, args)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


def test_the_workflow_has_no_lint_finding_but_the_per_rule_conda_one():
    proc = _check("lint_workflow.py")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("has_log", [True, False])
def test_any_lint_finding_but_the_conda_one_fails_the_check(tmp_path, has_log):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(RULE.format(log='    log:\n        "make.log",\n' if has_log else ""))
    proc = _check("lint_workflow.py", snakefile)
    assert proc.returncode == (0 if has_log else 1), proc.stderr
    if not has_log:
        assert f"rule make ({snakefile}, line 2): No log directive defined" in proc.stderr


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The repository's schemas, config and recipes, to be spoilt one at a time."""
    shutil.copytree(REPOSITORY / "src" / "moeforge" / "schemas", tmp_path / "src" / "moeforge" / "schemas")
    shutil.copytree(REPOSITORY / "config", tmp_path / "config")
    return tmp_path


def _edit(path: Path, change) -> None:
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document))


def test_the_shipped_schemas_config_and_recipes_pass_the_schema_check(tree):
    proc = _check("check_schemas.py", tree)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("file", "change", "message"), [
    ("src/moeforge/schemas/lock.schema.yaml", lambda s: s.update({"$schema": "http://json-schema.org/draft-07/schema#"}),
     "$schema must be 'https://json-schema.org/draft/2020-12/schema'"),
    ("src/moeforge/schemas/recipe.schema.yaml", lambda s: s["properties"]["gate_mode"].update({"enum": "hidden"}),
     "properties.gate_mode.enum: 'hidden' is not of type 'array'"),
    ("config/recipes/demo.yaml", lambda r: r.update({"experts_per_tok": 2}),
     "experts_per_tok: unknown key 'experts_per_tok'; did you mean 'experts_per_token'?"),
    ("config/config.yaml", lambda c: c.update({"smoke": {"max_new_tokens": "many"}}),
     "smoke.max_new_tokens: 'many' is not of type 'integer'"),
])
def test_a_broken_schema_or_a_document_off_its_schema_fails_the_check(tree, file, change, message):
    _edit(tree / file, change)
    proc = _check("check_schemas.py", tree)
    assert proc.returncode == 1
    assert f"schema check: {tree / file}: {message}" in proc.stderr
