"""``snakemake --lint`` for CI's fast stage: fails on every finding except the per-rule conda one.

moeforge's rules run in the environment moeforge is installed into (envs/requirements.txt), not in
per-rule conda environments: where it is tested there are no conda channels. So every rule draws
Snakemake's "Specify a conda environment or container" finding, and that one alone is expected;
any other (a rule without ``log:``, an absolute path, a tab, ...) fails the check.

Snakemake 9's command line prints the findings as text whatever ``--lint json`` says (it drops the
format on the way to the API), so they are read here as data, through the API's ``lint(json=True)``.

    python tests/lint_workflow.py [SNAKEFILE]      (default: the repository's Snakefile)
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

#: The finding every rule has on purpose (no conda: directive), as Snakemake titles it.
EXPECTED = "Specify a conda environment or container for each rule."
REPOSITORY = Path(__file__).resolve().parents[1]


def lint_findings(snakefile: Path) -> dict[str, list[dict[str, Any]]]:
    """Snakemake's lint of ``snakefile``, parsed in its own directory: ``{"snakefiles": [...], "rules": [...]}``."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings

    printed = io.StringIO()
    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=snakefile.resolve(),
                                workdir=snakefile.resolve().parent)
        with contextlib.redirect_stdout(printed):
            workflow.lint(json=True)
    text = printed.getvalue()
    return json.loads(text[text.index('{\n  "snakefiles"'):])


def unexpected(findings: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per finding other than EXPECTED, naming the rule or Snakefile and where it is."""
    lines = []
    for kind in ("snakefiles", "rules"):
        for item in findings[kind]:
            where = item["for"]
            place = (f"rule {where['rule']} ({where['snakefile']}, line {where['line']})" if kind == "rules"
                     else str(where["snakefile"]))
            lines += [f"{place}: {lint['title']}" for lint in item["lints"] if lint["title"] != EXPECTED]
    return lines


def main(argv: list[str]) -> int:
    snakefile = Path(argv[1]) if len(argv) > 1 else REPOSITORY / "Snakefile"
    findings = unexpected(lint_findings(snakefile))
    for line in findings:
        print(f"snakemake --lint: {line}", file=sys.stderr)
    if findings:
        print(f"snakemake --lint: {len(findings)} finding(s) in {snakefile}; fix them (only the per-rule conda "
              "finding is expected), see `snakemake --lint` for the details", file=sys.stderr)
        return 1
    print(f"snakemake --lint: {snakefile} has no finding but the expected per-rule conda one")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
