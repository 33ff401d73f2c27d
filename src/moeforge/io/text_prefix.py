"""The first tokens of a text file, reading only as much of the file as they need.

Stages that read users' texts (the evaluation's domains, router training's texts) use a bounded number of
tokens from each, so their memory and time must not grow with the file: a 64 MiB text costs what its first
kilobytes do, and gives the same tokens the whole text gives.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

from moeforge.errors import MoeforgeError

#: Tokens read past ``max_tokens`` before the first ``max_tokens`` are taken: a text cut mid-word tokenizes
#: differently only at its end, so these make the kept tokens the ones the whole text gives.
TOKEN_MARGIN = 64
#: Bytes first read per token wanted; the read grows fourfold until enough tokens come (or the file ends).
BYTES_PER_TOKEN = 8


def prefix_ids(tokenizer: Any, path: Path, max_tokens: int, where: str, error: type[MoeforgeError],
               fix: str) -> list[int]:
    """The first ``max_tokens`` tokens of the UTF-8 file ``path`` (no special tokens); text that is not UTF-8 is
    one ``error`` naming the byte and line."""
    want = max_tokens + TOKEN_MARGIN
    nbytes = want * BYTES_PER_TOKEN
    while True:
        text, complete = utf8_prefix(path, nbytes, where, error, fix)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if complete or len(ids) >= want:
            return ids[:max_tokens]
        nbytes *= 4


def utf8_prefix(path: Path, nbytes: int, where: str, error: type[MoeforgeError], fix: str) -> tuple[str, bool]:
    """The file's first ``nbytes`` bytes as text (a character cut at the end left out), and whether that is all."""
    with open(path, "rb") as fh:
        data = fh.read(nbytes)
        complete = len(data) < nbytes or not fh.read(1)
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=complete), complete
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at position {exc.start}, line {line})",
                    where, fix) from None
