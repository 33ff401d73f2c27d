"""Source models as validation sees them, and every check made on them from metadata alone.

Each check reads config.json, tokenizer files and the safetensors inventory, never a weight, so
an incompatible expert is refused before anything is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from moeforge.errors import ModelError
from moeforge.io.fetch import REFETCH_FIX
from moeforge.io.files import read_json
from moeforge.io.inventory_table import read_inventory
from moeforge.io.model_config import fix_for, require_object
from moeforge.io.refs import parse_ref
from moeforge.io.safetensors_file import TensorEntry
from moeforge.plan import templates as arch
from moeforge.plan.params import read_params
from moeforge.plan.recipe import Recipe
from moeforge.plan.templates import InputFamily, OutputFamily, TensorSpec

FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass
class Source:
    """One source model as validation sees it."""

    ref: str
    slug: str
    meta_dir: Path
    config: dict[str, Any]
    family: InputFamily
    params: dict[str, Any]
    inventory: dict[str, TensorEntry]
    source_json: dict[str, Any]


@dataclass
class PlanContext:
    """Findings collected while planning: decisions (what and why) and warnings."""

    decisions: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def decide(self, what: str, why: str) -> None:
        self.decisions.append({"what": what, "why": why})


def load_source(ref: str, meta_dir: Path) -> Source:
    """Read a fetched source's metadata and classify it by model_type."""
    config, family, params = read_params(ref, meta_dir)
    return Source(ref=ref, slug=parse_ref(ref).slug, meta_dir=meta_dir, config=config, family=family,
                  params=params, inventory=read_inventory(meta_dir / "inventory.tsv"),
                  source_json=json.loads((meta_dir / "source.json").read_text()))


def _expected(source: Source, spec: TensorSpec, layer: int | None) -> tuple[str, tuple[int, ...]]:
    name = spec.name if layer is None else source.family.layer_name(layer, spec)
    return name, spec.expected_shape(source.params)


def check_inventory(source: Source, roles: str = "all") -> None:
    """Every tensor the template requires exists, with the shape the config implies, as a float."""
    fam, p = source.family, source.params
    groups: list[tuple[Mapping[str, TensorSpec], int | None]] = []
    if roles == "all":
        groups.append((fam.globals, None))
    layer_specs = {**fam.attention, **fam.mlp} if roles == "all" else dict(fam.mlp)
    for layer in range(p["num_hidden_layers"]):
        groups.append((layer_specs, layer))
    for specs, layer in groups:
        for spec in specs.values():
            if not spec.present(p):
                continue
            name, shape = _expected(source, spec, layer)
            entry = source.inventory.get(name)
            if entry is None:
                hint = ("the config says tie_word_embeddings is false; if the model ties its embeddings, "
                        "its config.json should say true" if spec.role == "lm_head"
                        else "the checkpoint is incomplete or the config does not match the weights")
                raise ModelError(f"tensor {name!r} is missing from the weights", f"model {source.ref}", hint)
            if entry.shape != shape:
                raise ModelError(
                    f"tensor {name!r} has shape {list(entry.shape)} but config.json implies {list(shape)}",
                    f"model {source.ref} ({entry.file})", "the config does not match the weights")
            if entry.dtype not in FLOAT_DTYPES:
                raise ModelError(f"tensor {name!r} has dtype {entry.dtype}; only F32/F16/BF16 can be merged",
                                 f"model {source.ref} ({entry.file})",
                                 "quantized checkpoints cannot be merged: use the unquantized model")


def _tokenizer_vocab(source: Source) -> dict[str, int] | None:
    path = source.meta_dir / "tokenizer.json"
    if not path.is_file():
        return None
    where = f"model {source.ref} (tokenizer.json)"
    data = require_object(read_json(path, f"model {source.ref}", ModelError, REFETCH_FIX), "tokenizer.json", where,
                          fix_for("tokenizer.json"))
    vocab = _vocab_of(data)
    if vocab is None:
        raise ModelError("model.vocab or added_tokens is not in the tokenizers library's format (a mapping of "
                         "tokens to ids, and a list of {content, id} objects)", where, fix_for("tokenizer.json"))
    return vocab


def _vocab_of(data: Mapping[str, Any]) -> dict[Any, Any] | None:
    """Token -> id (or score) of a parsed tokenizer.json, added tokens included; None when it has another shape."""
    model = data.get("model") or {}
    try:
        vocab = dict(model.get("vocab") or {})
        for tok in data.get("added_tokens") or []:
            vocab[tok["content"]] = tok["id"]
    except (TypeError, ValueError, KeyError, AttributeError):
        return None
    return vocab


def _rope_text(rope: Mapping[str, Any]) -> str:
    return f"rope_theta={rope['theta']:g}, scaling={json.dumps(rope['scaling'], sort_keys=True)}"


def check_against_base(base: Source, other: Source, role: str, recipe: Recipe, ctx: PlanContext) -> None:
    """An expert must fit the base: same shapes and semantics of what the merge combines.

    A shared expert may be wider or narrower than the base's MLP: its width is its own.
    """
    for key in base.family.agree:
        if key == "intermediate_size" and role == "shared expert":
            continue
        if base.params[key] != other.params[key]:
            raise ModelError(
                f"{key} is {other.params[key]!r} but the base model {base.ref} has {base.params[key]!r}",
                f"{role} {other.ref}", "every expert must have the base model's shape; pick a fine-tune of the same base")
    if base.params["rope"] != other.params["rope"]:
        message = (f"rope settings differ: {_rope_text(other.params['rope'])} vs the base's "
                   f"{_rope_text(base.params['rope'])}; the merged model uses the base's attention, so this "
                   f"expert's MLP would see positions encoded differently from its training")
        if not recipe.allow_rope_mismatch:
            raise ModelError(message, f"{role} {other.ref}", "set allow_rope_mismatch: true to merge anyway")
        ctx.warnings.append(f"{role} {other.ref}: {message} (allowed by allow_rope_mismatch)")
    if base.params["rms_norm_eps"] != other.params["rms_norm_eps"]:
        ctx.warnings.append(f"{role} {other.ref}: rms_norm_eps {other.params['rms_norm_eps']} differs from the "
                            f"base's {base.params['rms_norm_eps']}; the base's value is used")
    if base.params["tied"] != other.params["tied"]:
        ctx.warnings.append(f"{role} {other.ref}: tie_word_embeddings {other.params['tied']} differs from the base; "
                            "embeddings come from the base, so this does not affect the merge")
    if base.family.name != other.family.name:
        ctx.decide(f"{role} {other.ref} is {other.family.name}, the base is {base.family.name}",
                   "their tensor shapes and MLP semantics agree, so they can be mixed")
        ctx.warnings.append(f"{role} {other.ref} is a {other.family.name} model and the base {base.ref} a "
                            f"{base.family.name} one: the shapes fit, but its MLP learned beside other attention "
                            "weights than the base's, so unless both come from the same pretrained model it will "
                            "compute poorly in the merge (mergekit-moe refuses such a Mixtral)")
    base_vocab, other_vocab = _tokenizer_vocab(base), _tokenizer_vocab(other)
    if base_vocab is None or other_vocab is None:
        missing = " and ".join(f"{who} {src.ref}" for who, src, vocab in
                               (("the base", base, base_vocab), (role, other, other_vocab)) if vocab is None)
        ctx.warnings.append(f"{role} {other.ref}: no tokenizer.json in {missing}, so the check that it shares the "
                            "base's vocabulary was skipped; a different vocabulary would make this expert useless")
    elif base_vocab != other_vocab:
        diff = sorted(set(base_vocab.items()) ^ set(other_vocab.items()))[:3]
        raise ModelError(f"tokenizer vocabulary differs from the base's (e.g. {diff})", f"{role} {other.ref}",
                         "experts must share the base's tokenizer; a different vocabulary means a different model")


def output_family(recipe: Recipe, base: Source) -> OutputFamily:
    return arch.choose_output(recipe.architecture, base.family)


def check_representable(base: Source, experts: list[Source], out: OutputFamily) -> None:
    """Refuse what the output family cannot hold (or needs and cannot get), never drop or invent silently."""
    for role in out.required_attention:
        spec = base.family.attention.get(role)
        if spec is None or not spec.present(base.params):
            raise ModelError(
                f"{out.name} needs {out.attention[role]} ({role}), which the {base.family.name} base does not have "
                f"and which has no exact neutral value", f"base model {base.ref}",
                f"use a base of a family that has it, or the {base.family.default_output} output")
    for spec in base.family.attention.values():
        if spec.present(base.params) and spec.role not in out.attention:
            raise ModelError(
                f"the base has {spec.name} ({spec.role}), which {out.name} has no place for; "
                f"dropping it would change the model's outputs", f"base model {base.ref}",
                f"choose an output architecture that keeps it (e.g. the {base.family.default_output} default)")
    for source in experts:
        for spec in source.family.mlp.values():
            if spec.present(source.params) and spec.role not in out.experts:
                raise ModelError(f"the model has MLP tensor {spec.name} ({spec.role}), which {out.name} "
                                 "experts cannot hold", f"expert {source.ref}",
                                 "choose a model without MLP biases or another output architecture")
