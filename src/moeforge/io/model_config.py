"""The fields of a model's JSON metadata files that moeforge reads, each with the type it must have: one table.

A config.json that is a list, or holds ``"hidden_size": "128x"`` or ``"rope_theta": null``, otherwise
fails deep in planning (or, for generation_config.json and tokenizer_config.json, in the gates or smoke
job that loads them) as a Python exception reported as "a moeforge bug"; checked here, when the metadata
is fetched and again when it is planned from, it is one message naming the model, the file and the key.
Only the fields moeforge or transformers' loading reads are checked, so the many other keys such files
carry pass untouched.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from moeforge.errors import ModelError


def _integer(value: Any) -> bool:
    """An int, or a float with an integral value (JSON does not tell 2 from 2.0); never a bool."""
    return not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, float) and value.is_integer())


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


#: More decoder layers than any model has by orders of magnitude: planning lists every layer, so a count
#: of 1e300 would exhaust memory before the weights could contradict it.
MAX_LAYERS = 100_000

#: A kind of value: its test and the words of the message when a value fails it.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive integer": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "layer count": (lambda v: _integer(v) and 0 < v <= MAX_LAYERS, f"a positive integer up to {MAX_LAYERS}"),
    "count": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "positive number": (lambda v: _number(v) and v > 0, "a positive finite number"),
    "number": (_number, "a finite number"),
    "boolean": (lambda v: isinstance(v, bool), "true or false"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object ({...})"),
    "strings": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "token ids": (lambda v: _integer(v) and v >= 0 or isinstance(v, list) and all(_integer(x) and x >= 0 for x in v),
                  "a token id or a list of token ids"),
    "token": (lambda v: isinstance(v, str) or isinstance(v, dict) and isinstance(v.get("content"), str),
              "a token string or an object with its content"),
    "file map": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                 "an object of tensor names to file names"),
    "chat template": (lambda v: isinstance(v, str) or isinstance(v, list) and all(
        isinstance(x, dict) and isinstance(x.get("template"), str) for x in v),
        "a template string or a list of {name, template} objects"),
}

#: config.json: field -> (kind, whether null is allowed). Nulls are allowed where transformers writes them
#: for "unset".
CONFIG_FIELDS: dict[str, tuple[str, bool]] = {
    "model_type": ("string", False),
    "hidden_size": ("positive integer", False),
    "intermediate_size": ("positive integer", False),
    "num_hidden_layers": ("layer count", False),
    "num_attention_heads": ("positive integer", False),
    "num_key_value_heads": ("positive integer", True),
    "head_dim": ("positive integer", True),
    "vocab_size": ("positive integer", False),
    "max_position_embeddings": ("positive integer", True),
    "sliding_window": ("count", True),
    "max_window_layers": ("count", True),
    "layer_types": ("strings", True),
    "rms_norm_eps": ("positive number", False),
    "rope_theta": ("positive number", False),
    "rope_scaling": ("object", True),
    "rope_parameters": ("object", True),
    "initializer_range": ("number", True),
    "attention_dropout": ("number", True),
    "hidden_act": ("string", False),
    "hidden_activation": ("string", True),
    "attention_bias": ("boolean", True),
    "mlp_bias": ("boolean", True),
    "tie_word_embeddings": ("boolean", True),
    "use_sliding_window": ("boolean", True),
    "dtype": ("string", True),
    "torch_dtype": ("string", True),
    "bos_token_id": ("token ids", True),
    "eos_token_id": ("token ids", True),
    "pad_token_id": ("token ids", True),
}

#: The fields of ``rope_scaling`` / ``rope_parameters`` that planning reads (their other fields are copied).
ROPE_FIELDS: dict[str, tuple[str, bool]] = {
    "rope_type": ("string", False),
    "type": ("string", False),
    "rope_theta": ("positive number", False),
    "factor": ("positive number", False),
}

#: The other JSON metadata files whose fields are read (by moeforge, or by transformers in the gates and smoke
#: jobs); the rest (tokenizer.json, special_tokens_map.json, ...) need only be objects here and are read where
#: they are used.
FILE_FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "config.json": CONFIG_FIELDS,
    "generation_config.json": {
        "bos_token_id": ("token ids", True),
        "eos_token_id": ("token ids", True),
        "pad_token_id": ("token ids", True),
        "max_length": ("positive integer", True),
        "max_new_tokens": ("positive integer", True),
    },
    "model.safetensors.index.json": {
        "weight_map": ("file map", False),
    },
    "tokenizer_config.json": {
        "bos_token": ("token", True),
        "eos_token": ("token", True),
        "pad_token": ("token", True),
        "unk_token": ("token", True),
        "chat_template": ("chat template", True),
        "tokenizer_class": ("string", True),
        "model_max_length": ("positive number", True),
        "add_bos_token": ("boolean", True),
        "add_eos_token": ("boolean", True),
        "added_tokens_decoder": ("object", True),
    },
}


def fix_for(name: str) -> str:
    """What to do about a metadata file of the wrong shape, in every message about one."""
    return f"fix or re-download the model's {name}"


def _json_kind(value: Any) -> str:
    """The JSON name of a value's type, for a message about a document that is not an object."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def require_object(document: Any, name: str, where: str, fix: str) -> dict[str, Any]:
    """``document`` (a parsed JSON file called ``name``) when it is an object; else one ModelError."""
    if not isinstance(document, dict):
        raise ModelError(f"{name} holds {_json_kind(document)}, not a JSON object", where, fix)
    return document


def _field_problem(key: str, value: Any, kind: str, nullable: bool) -> str | None:
    if value is None:
        return None if nullable else f"{key} is null, not {_KINDS[kind][1]}"
    test, words = _KINDS[kind]
    return None if test(value) else f"{key} is {value!r}, not {words}"


def _problems(document: Mapping[str, Any], fields: Mapping[str, tuple[str, bool]], prefix: str = "") -> list[str]:
    found = (_field_problem(prefix + key, document[key], kind, nullable)
             for key, (kind, nullable) in fields.items() if key in document)
    return [problem for problem in found if problem]


def metadata_problems(name: str, document: Mapping[str, Any]) -> list[str]:
    """Every field of the metadata file ``name`` that has a value of the wrong type, one line each (absent
    fields are not problems here: which are required is planning's concern)."""
    problems = _problems(document, FILE_FIELDS.get(name, {}))
    if name == "config.json":
        for block in ("rope_scaling", "rope_parameters"):
            if isinstance(document.get(block), dict):
                problems += _problems(document[block], ROPE_FIELDS, f"{block}.")
    return problems


def checked_metadata(document: Any, name: str, where: str) -> dict[str, Any]:
    """A parsed JSON metadata file ``name`` of a model, refused as one ModelError at ``where`` when it is not an
    object or a field that is read has the wrong type (the first problem, then the others)."""
    checked = require_object(document, name, where, fix_for(name))
    problems = metadata_problems(name, checked)
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise ModelError(problems[0] + more, where, fix_for(name))
    return checked
