"""Check the plan against the installed transformers' model class, before a model directory is assembled.

The peer tool once produced Mixtral checkpoints without attention weights: nothing compared
what it wrote with what the model class expects. Here the output family's class is built on
the meta device (no memory) from the translated config, and the plan's tensor names and
shapes must match its state dict exactly. transformers 5.x fuses MoE experts in memory; the
output template's ``in_memory_5x`` section says how classic on-disk names map to that layout,
so the comparison holds on 4.x (classic names in memory) and 5.x alike.

A check is named by what it reads (``check_settings``): merges and search candidates with the same config
and the same planned shapes share one record, ``results/class_checks/<key>.json``, and one job, which imports
torch and transformers. Assembly takes the record of its own settings and refuses a config.json other than
the one checked.
"""

from __future__ import annotations

import copy
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterable, Mapping

from moeforge.errors import BuildError
from moeforge.io.files import json_sha256, write_json
from moeforge.plan.plan_json import Plan, read_plan
from moeforge.plan.table import planned_shapes, read_rows
from moeforge.plan.templates import OutputFamily, output_family_for
from moeforge.plan.translate import build_config, read_base_config

#: A key: 16 hex digits of the hash of the settings.
CHECK_KEY_PATTERN = r"[0-9a-f]{16}"
#: Part of every key, so that a change in how the check works can give every record a new key.
_KEY_FORMAT = "moeforge class check 1"


def class_state_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes the installed class expects for this config (built on meta)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # A copy: the config class normalises nested values (rope) in place.
    fields = copy.deepcopy({k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    cfg = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


def _fuse(planned: dict[str, tuple[int, ...]], out: OutputFamily, num_layers: int,
          num_experts: int) -> dict[str, tuple[int, ...]]:
    """Classic names -> transformers 5.x in-memory names, per the template's fused layout."""
    fused = dict(planned)
    for layer in range(num_layers):
        prefix = out.layer_prefix.format(layer=layer)
        for rule in out.in_memory_5x:
            per_source = [[prefix + src.replace("{expert}", str(e)) for e in range(num_experts)]
                          if "{expert}" in src else [prefix + src] for src in rule.sources]
            names = [n for group in per_source for n in group]
            if not all(n in fused for n in names):
                continue
            shapes = [fused.pop(n) for n in names]
            first = shapes[0]
            if rule.op == "rename":
                target_shape = first
            elif rule.op == "stack":
                target_shape = (len(shapes), *first)
            else:
                rows = sum(shapes[i * num_experts][0] for i in range(len(rule.sources)))
                target_shape = (num_experts, rows, *first[1:])
            fused[prefix + rule.target] = target_shape
    return fused


def _names(items: Iterable[str], limit: int = 5) -> str:
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_plan_against_class(planned: dict[str, tuple[int, ...]], config: Mapping[str, Any], out: OutputFamily,
                             num_layers: int, num_experts: int) -> dict[str, Any]:
    """Raise BuildError unless the plan is exactly what the class expects; returns a summary."""
    expected = class_state_shapes(config)
    layout = "classic"
    comparable = planned
    if not set(planned) <= set(expected) and out.in_memory_5x:
        comparable = _fuse(planned, out, num_layers, num_experts)
        layout = "fused (transformers 5.x in-memory)"
    missing = set(expected) - set(comparable)
    unexpected = set(comparable) - set(expected)
    mismatched = {k for k in set(expected) & set(comparable) if tuple(expected[k]) != tuple(comparable[k])}
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) the class needs are not planned: {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} planned tensor(s) the class does not have: {_names(unexpected)}")
        if mismatched:
            parts.append("shape mismatch: " + _names(f"{k} planned {list(comparable[k])} vs class "
                                                     f"{list(expected[k])}" for k in mismatched))
        raise BuildError("; ".join(parts), f"{config['model_type']} plan vs the installed transformers class",
                         "this is a template or planning bug; please report it with your recipe")
    return {"tensors": len(expected), "layout_compared": layout}


def check_settings(plan: Plan, config: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Everything the class check reads, as JSON: its key and the job's one parameter.

    The output config (as ``translate`` builds it), the planned names and shapes, the layout the template
    fuses them to, and the installed transformers' version, whose class is the one compared. Search candidates
    that differ only in what neither the config nor the shapes hold (the gate mode, the prompts, router
    training) get one check; a merge checked under another transformers gets a new one."""
    return {"format": _KEY_FORMAT, "transformers": version("transformers"), "output_family": plan.output_family,
            "num_layers": plan.num_layers, "num_experts": plan.num_experts, "config": dict(config),
            "planned": {name: list(shape) for name, shape in sorted(planned_shapes(rows).items())}}


def merge_check_settings(plan_json: Path, plan_tsv: Path, base_meta: Path) -> dict[str, Any]:
    """``check_settings`` of a validated merge: its config built from its plan and the base's config, as
    translate_config writes it."""
    plan = read_plan(plan_json)
    config, _ = build_config(plan, read_base_config(base_meta))
    return check_settings(plan, config, read_rows(plan_tsv))


def check_key(settings: Mapping[str, Any]) -> str:
    """The name of a check's record: a hash of its settings."""
    return json_sha256(settings)[:16]


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of a config as JSON (keys sorted): what assembly compares the config it ships against."""
    return json_sha256(config)


def class_check(settings: Mapping[str, Any], out_json: Path) -> dict[str, Any]:
    """The class_check step: the planned tensors, under the config, must be exactly what the installed
    transformers class expects. The record names the config it checked (``config_sha256``)."""
    planned = {name: tuple(shape) for name, shape in settings["planned"].items()}
    checked = config_digest(settings["config"])
    summary = check_plan_against_class(planned, settings["config"], output_family_for(settings["output_family"]),
                                       settings["num_layers"], settings["num_experts"])
    summary.update(transformers=settings["transformers"], config_sha256=checked)
    write_json(out_json, summary)
    return summary


def require_checked(config_json: Path, record: Path) -> None:
    """Refuse a config.json other than the one the class check passed (hand-edited, or written by other code)."""
    checked = json.loads(record.read_text())["config_sha256"]
    if config_digest(json.loads(config_json.read_text())) != checked:
        raise BuildError("this config.json is not the one checked against the transformers class "
                         f"({record})", str(config_json),
                         "delete it and run again: translate_config writes it anew and the check passes on it")
