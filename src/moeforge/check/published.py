"""Is a moeforge rebuild of a published merge the published merge? Tensor by tensor, grouped by role.

A published merge need not be moeforge's: mergekit-moe 0.1.5 writes the fused layout, moeforge the
classic one, so both are read under their classic names (check/layouts.py) and each (layer, expert,
matrix) is compared on its own. Files and their hashes say nothing here (another tool, another
layout), so the verdict is the tensors': bit-identical, or how far apart (max |Δ|), and for routers
the cosine of each expert's row, which says whether routing would change. A published config that
does not match the rebuild (layers, vocab, experts) is a finding in the report: the recipe in the
repo is then not the one the model was built from.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping

import torch

from moeforge.check.layouts import ROLES, Reader, classic_view, natural_order, place_of, place_patterns
from moeforge.check.reproduce import differing_elements
from moeforge.errors import ModelError
from moeforge.io.files import read_json, write_json, write_text
from moeforge.io.progress import tracked
from moeforge.io.published import PublishedRef
from moeforge.numbers import fmt, report_number
from moeforge.plan.plan_json import Plan, read_plan
from moeforge.plan.prompts import smoke_prompts
from moeforge.plan.templates import OutputFamily, load_all

log = logging.getLogger(__name__)

#: config.json keys that say which merge a model is; an MoE family names its expert count one of two ways.
_CONFIG_KEYS = {"layers": ("num_hidden_layers",), "vocab": ("vocab_size",), "hidden": ("hidden_size",),
                "experts": ("num_local_experts", "num_experts"), "experts_per_token": ("num_experts_per_tok",)}


def _config_value(config: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    sub = config.get("text_config") or {}
    return next((c[k] for c in (config, sub) for k in keys if k in c), None)


def config_mismatches(rebuilt: Mapping[str, Any], published: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The shape-defining config values that differ: the published model was not built from this recipe."""
    out = []
    for what, keys in _CONFIG_KEYS.items():
        new, old = _config_value(rebuilt, keys), _config_value(published, keys)
        if new != old:
            out.append({"what": what, "rebuilt": new, "published": old})
    return out


def _router_cosines(new: torch.Tensor, old: torch.Tensor) -> list[float]:
    return [report_number(c) for c in torch.nn.functional.cosine_similarity(new.double(), old.double(), dim=-1)]


def _compare(new: torch.Tensor, old: torch.Tensor) -> dict[str, Any] | None:
    """None when bit-identical (same dtype, same values); else how far apart, in float64 if the dtypes differ
    (a dtype difference alone is a difference: the bytes are not the published ones)."""
    if new.dtype == old.dtype:
        return differing_elements(new, old)
    diff = differing_elements(new.double(), old.double()) or {"max_abs_diff": 0.0, "differing_elements": 0,
                                                              "elements": new.numel()}
    kinds = [str(t.dtype).removeprefix("torch.") for t in (new, old)]
    return {**diff, "dtypes": f"{kinds[0]} rebuilt, {kinds[1]} published"}


def compare_models(rebuilt_dir: Path, published_dir: Path, family: OutputFamily) -> dict[str, Any]:
    """Every classic tensor of both models, one pair in memory at a time: per-role counts, differing tensors,
    and each router row's cosine."""
    new_view, old_view = classic_view(rebuilt_dir, family), classic_view(published_dir, family)
    patterns = place_patterns(family)
    groups = {role: {"tensors": 0, "bit_identical": 0, "max_abs_diff": 0.0} for role in ROLES}
    differing, routers = [], []
    with ExitStack() as stack:
        new_reader, old_reader = Reader(stack), Reader(stack)
        names = list(natural_order(set(new_view) | set(old_view)))
        for name in tracked(names, "tensor comparison with the published model", len(names), "tensors"):
            place = place_of(name, patterns)
            group = groups[place.role]
            group["tensors"] += 1
            where = {"tensor": name, "role": place.role, "layer": place.layer, "expert": place.expert}
            if name not in old_view or name not in new_view:
                problem = "not in the published model" if name not in old_view else "missing from the rebuild"
                differing.append({**where, "problem": problem})
                group["max_abs_diff"] = None
                continue
            new, old = new_reader.read(new_view[name]), old_reader.read(old_view[name])
            if new.shape != old.shape:
                differing.append({**where, "problem": f"{list(new.shape)} rebuilt, {list(old.shape)} published"})
                group["max_abs_diff"] = None
                continue
            result = _compare(new, old)
            # One row per routed expert (a shared expert's gate is a router too, but has no expert rows).
            if place.layer is not None and name == family.layer_name(place.layer, family.router):
                routers += [{"layer": place.layer, "expert": e, "cosine": c}
                            for e, c in enumerate(_router_cosines(new, old))]
            if result is None:
                group["bit_identical"] += 1
                continue
            differing.append({**where, **result})
            if group["max_abs_diff"] is not None:
                group["max_abs_diff"] = _worst(group["max_abs_diff"], result["max_abs_diff"])
    return {"groups": {k: v for k, v in groups.items() if v["tensors"]}, "differing": differing, "routers": routers}


def _worst(a: float | None, b: float | None) -> float | None:
    """The larger |Δ|; a non-finite one (None in the report) wins."""
    return None if a is None or b is None else max(a, b)


def _published_config(path: Path) -> tuple[list[str], dict[str, Any]]:
    """The published config.json, or a note saying why there is none: its tensors can be compared anyway."""
    if not path.is_file():
        return ["the published model has no config.json: only its tensors are compared"], {}
    try:
        config = read_json(path, "", ModelError, "")
    except ModelError as exc:
        return [f"the published config.json cannot be read ({exc}): only its tensors are compared"], {}
    if not isinstance(config, dict):
        return ["the published config.json is not a JSON object: only its tensors are compared"], {}
    return [], config


def _source_notes(record: Mapping[str, Any]) -> list[str]:
    """Where the recipe came from, and the sources a published recipe leaves unpinned (a cause of differences)."""
    notes = [f"the recipe is the published {record['recipe_from']}"]
    if record["unpinned_hub_sources"]:
        notes.append("the recipe names Hub sources without a revision, so they were built as they are now: "
                     f"{', '.join(record['unpinned_hub_sources'])}")
    return notes


#: Why routers computed from prompts differ from mergekit-moe 0.1.5's, by gate mode (docs/gates.md).
ROUTER_DIFFERENCES = {
    "hidden": "mergekit-moe 0.1.5 runs the base in bfloat16 to compute hidden-state routers, moeforge in float32: "
              "router rows then differ by bfloat16 rounding (cosines above 0.999), everything else can be identical",
    "hidden_avg": "mergekit-moe 0.1.5 runs the base in bfloat16 and divides each prompt's sum by the padded batch "
                  "length, moeforge runs it in float32 and averages over the prompt's own tokens: router rows differ "
                  "in direction (docs/gates.md)",
}


def _router_note(plan: Plan, tensors: Mapping[str, Any]) -> list[str]:
    """The known cause when only the routers differ, for the gate modes whose computation differs on purpose."""
    routers = tensors["groups"].get("routers")
    known = ROUTER_DIFFERENCES.get(plan.recipe.gate_mode)
    if known is None or routers is None or routers["bit_identical"] == routers["tensors"]:
        return []
    return [f"routers differ as expected for gate_mode {plan.recipe.gate_mode}: {known}"]


#: How far router rows may turn, by gate mode, for the documented difference to explain them (a bfloat16
#: forward moves a row by rounding only; hidden_avg's divisor changes each row's weighting, not its sign).
DOCUMENTED_MIN_COSINE = {"hidden": 0.999, "hidden_avg": 0.9}


def published_verdict(gate_mode: str, mismatches: list, tensors: Mapping[str, Any]) -> str:
    """``identical``; ``identical except the documented router difference`` when the routers alone differ, by
    no more than the gate mode's documented cause explains; else ``different``."""
    if mismatches:
        return "different"
    if not tensors["differing"]:
        return "identical"
    others = [g for role, g in tensors["groups"].items() if role != "routers"]
    floor = DOCUMENTED_MIN_COSINE.get(gate_mode)
    summary = router_summary(tensors["routers"])
    if floor is not None and all(g["bit_identical"] == g["tensors"] for g in others) \
            and summary["min_cosine"] is not None and summary["min_cosine"] >= floor:
        return "identical except the documented router difference"
    return "different"


def router_summary(routers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Router rows in one line: how many, how many moved, the smallest cosine and where."""
    cosines = [r for r in routers if r["cosine"] is not None]
    lowest = min(cosines, key=lambda r: r["cosine"], default=None)
    return {"rows": len(routers), "rows_moved": sum(r["cosine"] is None or r["cosine"] < 1 for r in routers),
            "min_cosine": report_number(lowest["cosine"]) if lowest else None,
            "min_at": {"layer": lowest["layer"], "expert": lowest["expert"]} if lowest else None}


def reproduce_published(merge: str, raw: str, rebuilt_dir: Path, plan_path: Path, record_path: Path,
                        out_json: Path, out_md: Path) -> dict[str, Any]:
    """Compare the rebuild with the published model; write report.json and report.md; return the report.

    A difference (or a published config that does not match) is a finding, not a failure: the job succeeds.
    """
    plan = read_plan(plan_path)
    record = json.loads(record_path.read_text())
    family = load_all()[1][plan.output_family]
    # The commit the recipe was read at (a branch may have moved on since): the weights compared are that commit's.
    ref = PublishedRef(raw, model_dir=None if record["repo_id"] else Path(raw).expanduser(),
                       repo_id=record["repo_id"], revision=record["revision"])
    published_dir = ref.directory()
    config_notes, published_config = _published_config(published_dir / "config.json")
    notes = _source_notes(record) + config_notes
    rebuilt_config = json.loads((rebuilt_dir / "config.json").read_text())
    mismatches = config_mismatches(rebuilt_config, published_config) if published_config else []
    tensors = compare_models(rebuilt_dir, published_dir, family)
    verdict = published_verdict(plan.recipe.gate_mode, mismatches, tensors)
    identical = verdict != "different"
    notes += _router_note(plan, tensors)
    next_token = None
    if mismatches:
        notes.append("next-token comparison skipped: the two configs differ")
    else:
        next_token = next_token_comparison(rebuilt_dir, published_dir, smoke_prompts(plan.recipe), notes)
    report = {"merge": merge, "published": raw, "revision": ref.revision, "recipe_from": record["recipe_from"],
              "verdict": verdict, "router_summary": router_summary(tensors["routers"]),
              "config_mismatches": mismatches,
              **tensors, "next_token": next_token, "notes": notes}
    write_json(out_json, report)
    write_text(out_md, render_markdown(report))
    if not identical:
        log.warning("%s: the rebuild differs from %s; see %s", merge, raw, out_md)
    return report


def next_token_comparison(rebuilt_dir: Path, published_dir: Path, prompts: list[str],
                          notes: list[str]) -> dict[str, Any] | None:
    """KL(published || rebuilt), top-1 agreement and max |delta logit| on the smoke prompts.

    Both models run one module at a time (as the smoke test does), so this job needs one layer's
    memory, not two models'. A published model that cannot be run is a note, not a crash.
    """
    from moeforge.check.smoke import compare_logits
    from moeforge.io.hf_load import load_tokenizer
    from moeforge.runtime.layerwise import stream_sequences

    tokenizer = load_tokenizer(rebuilt_dir, ModelError, "the rebuilt model's tokenizer", "rerun assemble")
    ids = [i for i in (tokenizer(p, return_tensors="pt").input_ids for p in prompts) if i.shape[1]]
    if not ids:
        notes.append("next-token comparison skipped: no prompt has a token")
        return None
    try:
        published = stream_sequences(published_dir, ids).logits
    except Exception as exc:  # whatever the published files hold, the report still stands
        notes.append(f"next-token comparison skipped: the published model cannot be run ({type(exc).__name__}: "
                     f"{exc})")
        return None
    rebuilt = stream_sequences(rebuilt_dir, ids).logits
    return compare_logits([b[0] for b in published], [b[0] for b in rebuilt])


#: Router rows listed in the report (the lowest cosines); the rest are summed up by the smallest.
ROUTER_ROWS_SHOWN = 5


def render_markdown(report: Mapping[str, Any]) -> str:
    """The verdict, the config mismatches, a table per role, the differing tensors, the routers that moved."""
    lines = [f"# Reproduce {report['merge']}: {report['verdict']}", "",
             f"Rebuilt the published merge `{report['published']}` from its recipe and compared every tensor "
             "under its classic name (fused experts split per expert).", ""]
    lines += [f"- {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    if report["config_mismatches"]:
        lines += ["## The published config does not match the recipe's sources", "",
                  "| what | rebuilt | published |", "|---|---|---|"]
        lines += [f"| {m['what']} | {m['rebuilt']} | {m['published']} |" for m in report["config_mismatches"]]
        lines.append("")
    if report["next_token"]:
        nt = report["next_token"]
        lines += ["## Next-token comparison on the smoke prompts", "",
                  f"KL(published || rebuilt) mean {fmt(nt['kl_mean'])}, top-1 agreement {fmt(nt['top1_agreement'])}, "
                  f"max abs logit difference {fmt(nt['max_abs_logit_diff'])}.", ""]
    lines += ["## Tensors by role", "", "| role | tensors | bit-identical | max abs diff |", "|---|---|---|---|"]
    lines += [f"| {role} | {g['tensors']} | {g['bit_identical']} | {fmt(g['max_abs_diff'])} |"
              for role, g in report["groups"].items()] + [""]
    if report["differing"]:
        lines += ["## Tensors that differ", "", "| tensor | max abs diff | differing elements |", "|---|---|---|"]
        for t in report["differing"]:
            detail = t.get("problem") or f"{t['differing_elements']} of {t['elements']}"
            lines.append(f"| `{t['tensor']}` | {fmt(t.get('max_abs_diff'))} | {detail} |")
        lines.append("")
    summary = report["router_summary"]
    if summary["rows_moved"]:
        at = summary["min_at"] or {}
        lines += ["## Router rows", "", f"{summary['rows_moved']} of {summary['rows']} rows differ; the smallest "
                  f"cosine is {fmt(summary['min_cosine'])} (layer {at.get('layer')}, expert {at.get('expert')}). "
                  f"The {ROUTER_ROWS_SHOWN} lowest:", "", "| layer | expert | cosine |", "|---|---|---|"]
        moved = sorted((r for r in report["routers"] if r["cosine"] is None or r["cosine"] < 1),
                       key=lambda r: -1.0 if r["cosine"] is None else r["cosine"])
        lines += [f"| {r['layer']} | {r['expert']} | {fmt(r['cosine'])} |" for r in moved[:ROUTER_ROWS_SHOWN]]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
