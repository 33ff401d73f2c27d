"""The train_routers step: the merge's routers trained on its experts' texts, everything else frozen.

It reads no source model: the layer shards and the globals shard already hold every tensor of the output
model but the routers, under the output's names, the gates file holds the routers' starting point, and
config/config.json is the output's config; together they are the MoE, streamed or loaded from these files.
Everything that can be wrong with the inputs (device, memory for ``end_to_end``, every text) is checked
before any training. ``trained.safetensors`` has the gates file's tensor names and dtype, so the routers
shard reads it in the gates file's place.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from moeforge.errors import BuildError, ModelError
from moeforge.io.files import write_bytes
from moeforge.io.hf_load import load_tokenizer
from moeforge.io.progress import MIB
from moeforge.numbers import report_number
from moeforge.plan.plan_json import read_plan
from moeforge.plan.table import GATES_SOURCE, read_rows
from moeforge.resources import train_threads
from moeforge.runtime.devices import require_device
from moeforge.runtime.layerwise import CheckpointTensors, load_config
from moeforge.runtime.memory_budget import peak_rss
from moeforge.train.end_to_end import check_memory, train_end_to_end
from moeforge.train.layerwise import train_layerwise
from moeforge.train.loop import reproducible
from moeforge.train.report import write_reports
from moeforge.train.texts import TrainingWindows, training_windows


def merge_tensors(plan_tsv: Path, gates: Path, shards: Sequence[Path]) -> CheckpointTensors:
    """The MoE's tensors: the shards' under their own names, the gates file's under the names its plan rows give."""
    renamed = {row["source_name"]: row["target_name"] for row in read_rows(plan_tsv) if row["source"] == GATES_SOURCE}
    return CheckpointTensors.from_files([*shards, gates], {Path(gates): renamed})


def _write_trained(gates: Path, trained: dict[str, torch.Tensor], out: Path) -> None:
    """The gates file with the trained tensors in place: same names, order and dtype (same inputs, same bytes)."""
    tensors = load_file(str(gates))
    unknown = sorted(set(trained) - set(tensors))
    if unknown:
        raise BuildError(f"trained tensor {unknown[0]} is not in the gates file", str(gates), "rerun the gates step")
    out_tensors = {name: (trained[name].to(t.dtype) if name in trained else t).contiguous()
                   for name, t in tensors.items()}
    write_bytes(out, save(out_tensors, metadata={"format": "pt"}))


def _report(merge: str, settings: dict[str, Any], windows: TrainingWindows, layers: list[dict[str, Any]],
            loss_curves: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return {"merge": merge, "settings": settings, "experts": list(windows.groups),
            "texts": [asdict(record) for record in windows.records],
            "train_windows": int((~windows.heldout).sum()), "heldout_windows": int(windows.heldout.sum()),
            "heldout_tokens": int(windows.heldout.sum()) * (windows.ids.shape[1] - 1),
            "layers": layers, "loss_curves": loss_curves, "seconds": report_number(seconds),
            "peak_rss_mib": report_number(peak_rss() / MIB)}


def train_routers(plan_json: Path, plan_tsv: Path, gates: Path, shards: Sequence[Path], config_dir: Path,
                  tokenizer_dir: Path, out_tensors: Path, out_json: Path, out_md: Path, out_png: Path,
                  job_mem_mb: int | None = None) -> dict[str, Any]:
    """The step: check everything, train with the recipe's method, write the routers and the reports.

    Training runs on the plan's thread count (moeforge.resources.train_threads), not on the cores the job was
    given: another count may sum in another order, and hundreds of steps would carry that into the bytes.
    """
    plan = read_plan(plan_json)
    settings = plan.recipe.router_training
    if settings is None:
        raise BuildError("the recipe has no router_training", str(plan_json), "rerun the validate step")
    require_device(settings.device, "router_training.device")
    store = merge_tensors(plan_tsv, gates, shards)
    config = load_config(config_dir)
    if settings.method == "end_to_end":
        check_memory(store, config, settings, job_mem_mb)
    tokenizer = load_tokenizer(tokenizer_dir, ModelError, "the base model's tokenizer",
                               "rerun fetch_metadata for the base model")
    windows = training_windows(plan.recipe, tokenizer, settings, "recipe")
    num_routed = len(plan.recipe.experts)
    started = time.monotonic()
    with reproducible(train_threads(plan)):
        torch.manual_seed(settings.seed)
        if settings.method == "layerwise":
            trained, layers = train_layerwise(config_dir, store, windows, settings, num_routed)
            curves = [{"label": f"layer {row['layer']}", "losses": row.pop("losses")} for row in layers]
        else:
            trained, record = train_end_to_end(config_dir, store, windows, settings, num_routed,
                                               tokenizer.bos_token_id)
            sparse = sorted(int(name.split(".")[1]) for name in trained if name.endswith(".router"))
            layers = [{"layer": i, "heldout_before": b, "heldout_after": a}
                      for i, b, a in zip(sparse, record["heldout_before"], record["heldout_after"], strict=True)]
            curves = [{"label": "whole model", "losses": record["losses"]}]
    _write_trained(gates, trained, out_tensors)
    report = _report(plan.merge, asdict(settings), windows, layers, curves, time.monotonic() - started)
    write_reports(report, out_json, out_md, out_png)
    return report
