"""Run llama.cpp's own converter (``convert_hf_to_gguf.py``) on a model directory.

Run as ``python -m moeforge.check.gguf_convert CONVERTER_DIR MODEL_DIR [converter options]`` in a
child process (the converter is a script that parses ``sys.argv`` and may exit the interpreter).
Exit status ``UNSUPPORTED`` (3): the converter has no class for the model's architecture;
``UNKNOWN_TOKENIZER`` (4): it cannot name the tokenizer's pre-tokenizer; anything else non-zero is
the converter's own failure.

The converter names a byte-level BPE tokenizer's pre-tokenizer by hashing the token ids of a test
string, so it knows only the vocabularies it was released with: a tokenizer trained for a model
(the demo's and the tests' tiny ones) is refused even when its pre-tokenizer is one llama.cpp
implements. Only then, this driver names the pre-tokenizer from its definition in
``tokenizer.json`` (normalizer, split pattern, byte-level settings), when that equals the definition
of a llama.cpp pre-tokenizer type; anything else is refused as the converter refuses it. Published
tokenizers never reach that path: their hash is known.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path
from typing import Any

_log = logging.getLogger("moeforge.gguf")

UNSUPPORTED = 3
UNKNOWN_TOKENIZER = 4

#: Qwen2's split pattern, which llama.cpp implements as the pre-tokenizer type ``qwen2``
#: (``LLAMA_VOCAB_PRE_TYPE_QWEN2`` in src/llama-vocab.cpp quotes it as the original regex).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

#: llama.cpp pre-tokenizer types by their ``tokenizer.json`` definition: (normalizer, pre-tokenizer
#: steps). ``trim_offsets`` is left out of the comparison: it changes offsets, never token ids.
PRE_TOKENIZER_DEFINITIONS: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "qwen2": (
        {"type": "NFC"},
        [{"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
         {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}],
    ),
}


def pre_tokenizer_by_definition(tokenizer_json: Path) -> str | None:
    """The llama.cpp pre-tokenizer type whose definition ``tokenizer_json`` has, or None."""
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (spec.get("model") or {}).get("type") != "BPE":
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = [{k: v for k, v in step.items() if k != "trim_offsets"} for step in steps or []]
    for name, (normalizer, definition) in PRE_TOKENIZER_DEFINITIONS.items():
        if spec.get("normalizer") == normalizer and steps == definition:
            return name
    return None


def _name_pre_tokenizer_by_definition(text_model: type) -> None:
    """Wrap the converter's hash lookup: on an unknown hash, fall back to the tokenizer's definition."""
    by_hash = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return by_hash(self, tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_by_definition(Path(self.dir_model) / "tokenizer.json")
            if name is None:
                raise
            _log.warning("tokenizer unknown to the converter's hash list; its pre-tokenizer definition is "
                         "llama.cpp's %r, written as tokenizer.ggml.pre", name)
            return name

    text_model.get_vocab_base_pre = get_vocab_base_pre


def _architecture_supported(model_dir: Path) -> bool:
    """Whether the converter has a class for the architecture named in the model's config.json."""
    from conversion import get_model_class

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    try:
        for name in config.get("architectures") or []:
            get_model_class(name)
    except NotImplementedError:
        return False
    return True


def main(argv: list[str]) -> int:
    """Run the converter in ``argv[0]`` on the model directory ``argv[1]``, options ``argv[2:]``."""
    converter_dir, model_dir = Path(argv[0]), Path(argv[1])
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    from conversion.base import TextModel  # the converter's own package, found through sys.path

    if not _architecture_supported(model_dir):
        return UNSUPPORTED
    _name_pre_tokenizer_by_definition(TextModel)
    sys.argv = [str(converter_dir / "convert_hf_to_gguf.py"), *argv[1:]]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except NotImplementedError as exc:
        if "pre-tokenizer" not in str(exc):
            raise
        return UNKNOWN_TOKENIZER
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
