"""Loading with transformers in a batch job: stdin closed, local files only, no remote code.

Loading a config or tokenizer that carries ``auto_map`` can stop at an interactive prompt; a
job with an empty stdin fails instead of hanging until its time limit.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from moeforge.errors import MoeforgeError
from moeforge.io.fetch import TOKENIZER_FILES
from moeforge.io.files import read_json


@contextlib.contextmanager
def stdin_closed() -> Iterator[None]:
    """Give loads an empty stdin so a remote-code prompt cannot block a batch job."""
    saved = sys.stdin
    with open(os.devnull, encoding="utf-8") as devnull:
        sys.stdin = devnull
        try:
            yield
        finally:
            sys.stdin = saved


def _tokenizer_class(directory: Path, generic: bool) -> Any:
    """AutoTokenizer, or for a directory with a tokenizer.json, when asked, the generic fast class.

    AutoTokenizer imports the model-specific tokenizer classes and with them torch, which a job that
    only counts tokens does not use; the generic class reads the same tokenizer.json, so it counts the
    same tokens.
    """
    if generic and (Path(directory) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


def load_tokenizer(directory: Path, error: type[MoeforgeError], what: str, fix: str, generic: bool = False) -> Any:
    """The tokenizer of a model directory; a missing or broken one is one clear `error`.

    Its JSON files are parsed first: transformers' error for a damaged one does not say which file
    it is, so the error would only point at the directory. `generic`: see _tokenizer_class.
    """
    for name in TOKENIZER_FILES:
        if name.endswith(".json") and (Path(directory) / name).is_file():
            read_json(Path(directory) / name, what, error, fix)
    try:
        with stdin_closed():
            return _tokenizer_class(directory, generic).from_pretrained(str(directory), trust_remote_code=False,
                                                                       local_files_only=True)
    except Exception as exc:  # any failure to load is the files' fault, named with its directory
        raise error(f"cannot load {what}: {type(exc).__name__}: {exc}", str(directory), fix) from exc
