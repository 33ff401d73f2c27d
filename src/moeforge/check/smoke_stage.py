"""Plan-driven entry points of the gates and smoke-test rules.

The gate and smoke libraries take explicit options; these adapters derive those options
from plan.json (the single truth), so the Snakemake scripts stay one call each.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from moeforge.check.plots import plot_expert_load, plot_gate_similarity
from moeforge.check.report import write_report
from moeforge.check.smoke import SmokeFailure, SmokeOptions, run_smoke
from moeforge.io.fetch import weights_dir_of
from moeforge.io.files import write_text
from moeforge.plan.identity import is_identity_build
from moeforge.plan.plan_json import Plan, read_plan
from moeforge.plan.prompts import smoke_prompts
from moeforge.resources import smoke_dtype
from moeforge.runtime.devices import computes_16bit


def smoke_options(plan: Plan, device: str, max_new_tokens: int, dtype: str = "auto",
                  memory_gb: float | None = None, job_mem_mb: int | None = None) -> SmokeOptions:
    recipe = plan.recipe
    return SmokeOptions(prompts=smoke_prompts(recipe), max_new_tokens=recipe.max_new_tokens or max_new_tokens,
                        device=device, identity=is_identity_build(plan),
                        dtype=smoke_dtype(plan, dtype, computes_16bit(device)),
                        expert_prompts={e.name: list(e.positive_prompts) for e in recipe.experts if e.positive_prompts},
                        expert_names=[e.name for e in recipe.experts],
                        memory_gb=memory_gb, job_mem_mb=job_mem_mb, scanned_when_written=True)


def write_outcome(report: Mapping[str, Any], model_dir: Path, path: Path) -> None:
    """The smoke test's verdict and where the model it checked stands (relative to the working directory).

    Written pass or fail, as one of the job's logs: Snakemake removes a failed job's outputs and keeps its
    logs. A model that failed is never published; it stays in staging, where this record says, to be inspected.
    """
    write_text(path, json.dumps({**report, "model_dir": os.path.relpath(model_dir)}, indent=2, sort_keys=True,
                                ensure_ascii=False) + "\n")


def smoke_stage(model_dir: Path, plan_json: Path, gates_json: Path, translation_json: Path, base_weights: Path, *,
                device: str, dtype: str = "auto", memory_gb: float | None = None, job_mem_mb: int | None = None,
                max_new_tokens: int, out_json: Path, out_md: Path, load_png: Path, similarity_png: Path,
                outcome_json: Path) -> dict:
    """The smoke test of the staging model ``model_dir``: its reports, and ``outcome_json`` (see write_outcome)."""
    plan = read_plan(plan_json)
    try:
        opts = smoke_options(plan, device, max_new_tokens, dtype, memory_gb, job_mem_mb)
        report = run_smoke(model_dir, weights_dir_of(base_weights), opts)
    except Exception as exc:
        write_outcome(exc.report if isinstance(exc, SmokeFailure) else {"passed": False, "errors": [str(exc)]},
                      model_dir, outcome_json)
        logging.getLogger("moeforge").error("the model failed its smoke test and is not published; it stays in %s "
                                            "for inspection (see %s)", os.path.relpath(model_dir), outcome_json)
        raise
    translation = json.loads(translation_json.read_text())
    report["build"] = {"merge": plan.merge, "output_family": plan.output_family,
                       "warnings": list(plan.warnings), "decisions": [dict(d) for d in plan.decisions],
                       "translation": translation["decisions"],
                       "trust_remote_code": plan.recipe.trust_remote_code}
    gates = json.loads(gates_json.read_text())
    # Each once: a stage may repeat what validation already said (a rope translation warns in both).
    report["warnings"] = list(dict.fromkeys([*plan.warnings, *gates.get("warnings", []), *translation["warnings"],
                                             *report["warnings"]]))
    write_report(report, out_json, out_md)
    plot_expert_load(report, load_png)
    plot_gate_similarity(gates, similarity_png)
    write_outcome(report, model_dir, outcome_json)
    return report
