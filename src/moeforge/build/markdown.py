"""Text from a recipe or a lock, written into the model card as Markdown that stays Markdown.

Prompts are multi-line and hold ``|``, backticks and ``<``; names come from a lock someone handed over.
Written raw, one prompt breaks the experts table, a backtick run closes a code span early, a ```` ``` ````
inside the recipe ends its YAML block, and ``<script>`` is HTML. Each helper makes one kind of place safe.
"""

from __future__ import annotations

import re

#: What plain text in a cell must not be read as: HTML (as entities), and inline Markdown (backslash-escaped:
#: code spans, emphasis, links, strikethrough, and the cell border ``|``).
_PLAIN = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;",
                        **{c: "\\" + c for c in "\\`*_[]|~"}})


def cell(text: str) -> str:
    """Plain text in a table cell, shown as written: escaped, line breaks as ``<br>``."""
    return "<br>".join(text.translate(_PLAIN).splitlines())


def code(text: str, in_table: bool = False) -> str:
    """A code span showing ``text`` as it is: fenced by more backticks than any run inside it, one line
    (a code span cannot break a line), with ``|`` escaped inside a table (GFM reads it as a cell border)."""
    text = " ".join(text.splitlines())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or (text.startswith(" ") and text.endswith(" ")) else ""
    span = f"{fence}{pad}{text}{pad}{fence}"
    return span.replace("|", "\\|") if in_table else span


def fenced(text: str, info: str = "") -> list[str]:
    """A fenced code block holding ``text`` whole: its fence is longer than any backtick run inside."""
    longest = max((len(run) for run in re.findall(r"`{3,}", text)), default=2)
    fence = "`" * (longest + 1)
    return [f"{fence}{info}", text, fence]
