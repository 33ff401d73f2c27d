"""The benchmarks README's sections that scripts rewrite: the text between a script's two markers."""

from __future__ import annotations

from pathlib import Path


def write_readme_section(readme: Path, begin: str, end: str, text: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``readme`` (appended with its markers if absent)."""
    content = readme.read_text()
    block = f"{begin}\n{text}{end}"
    if begin in content and end in content:
        head, rest = content.split(begin, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(content)
