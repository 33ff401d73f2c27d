"""Plan-driven entry points of the gates and smoke-test rules.

The gate and smoke libraries take explicit options; these adapters derive those options
from plan.json (the single truth), so the Snakemake scripts stay one call each.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from moeforge.check.plots import plot_expert_load, plot_gate_similarity
from moeforge.check.report import write_report
from moeforge.check.smoke import SmokeFailure, SmokeOptions, run_smoke
from moeforge.io.fetch import weights_dir_of
from moeforge.plan.identity import is_identity_build
from moeforge.plan.prompts import smoke_prompts
from moeforge.resources import smoke_dtype
from moeforge.runtime.devices import computes_16bit


def smoke_options(plan: Mapping[str, Any], device: str, max_new_tokens: int, dtype: str = "auto",
                  memory_gb: float | None = None, job_mem_mb: int | None = None) -> SmokeOptions:
    recipe = plan["recipe"]
    expert_prompts = {e["name"]: list(e["positive_prompts"]) for e in recipe["experts"]}
    return SmokeOptions(prompts=smoke_prompts(recipe), max_new_tokens=recipe["max_new_tokens"] or max_new_tokens,
                        device=device, identity=is_identity_build(plan), dtype=smoke_dtype(plan, dtype, computes_16bit(device)),
                        expert_prompts={k: v for k, v in expert_prompts.items() if v},
                        expert_names=[e["name"] for e in recipe["experts"]],
                        memory_gb=memory_gb, job_mem_mb=job_mem_mb, scanned_when_written=True)


def set_aside_failed_model(model_dir: Path, exc: BaseException) -> Path:
    """Move a model that failed its checks out of the place a finished one stands; keep it to inspect.

    ``results/<merge>/model/`` with its lock means "built and checked". A failed model goes to
    ``results/<merge>/failed/model/`` (with the smoke report, when there is one), so neither a user
    nor a rerun mistakes it for a good one; a rerun reassembles it (rebuilding any shard already removed).
    """
    failed = model_dir.parent / "failed"
    if failed.exists():
        shutil.rmtree(failed)
    failed.mkdir(parents=True)
    os.replace(model_dir, failed / "model")
    if isinstance(exc, SmokeFailure):  # the report names the model where it now lies
        write_report(exc.report | {"model_dir": str(failed / "model")}, failed / "smoke-report.json",
                     failed / "smoke-report.md")
    logging.getLogger("moeforge").error("the model failed its checks; it was moved to %s for inspection, "
                                        "and a rerun reassembles it (rebuilding any shard already removed)", failed / "model")
    return failed / "model"


def smoke_stage(model_dir: Path, plan_json: Path, gates_json: Path, translation_json: Path, base_weights: Path, *,
                device: str, dtype: str = "auto", memory_gb: float | None = None, job_mem_mb: int | None = None,
                max_new_tokens: int, out_json: Path, out_md: Path, load_png: Path, similarity_png: Path) -> dict:
    plan = json.loads(plan_json.read_text())
    try:
        opts = smoke_options(plan, device, max_new_tokens, dtype, memory_gb, job_mem_mb)
        report = run_smoke(model_dir, weights_dir_of(base_weights), opts)
    except Exception as exc:
        set_aside_failed_model(model_dir, exc)
        raise
    translation = json.loads(translation_json.read_text())
    report["build"] = {"merge": plan["merge"], "output_family": plan["output_family"],
                       "warnings": plan["warnings"], "decisions": plan["decisions"],
                       "translation": translation["decisions"],
                       "trust_remote_code": plan["recipe"]["trust_remote_code"]}
    gates = json.loads(gates_json.read_text())
    # Each once: a stage may repeat what validation already said (a rope translation warns in both).
    report["warnings"] = list(dict.fromkeys([*plan["warnings"], *gates.get("warnings", []), *translation["warnings"],
                                             *report["warnings"]]))
    write_report(report, out_json, out_md)
    plot_expert_load(report, load_png)
    plot_gate_similarity(gates, similarity_png)
    return report
