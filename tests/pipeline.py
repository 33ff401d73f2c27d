"""Run the merge stages in-process, in the workflow's order, for fast tests.

The Snakemake rules call exactly these library functions (one per rule); the end-to-end
tests in test_workflow.py run the real workflow. This driver lets many recipe variations be
tested in seconds each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from moeforge.build.assemble import assemble
from moeforge.build.shards import shard_step
from moeforge.gates.compute import gates_for_plan
from moeforge.io.fetch import fetch_metadata, fetch_weights, locate_weights
from moeforge.io.refs import parse_ref
from moeforge.plan.class_check import class_check, merge_check_settings
from moeforge.plan.plan_json import Plan
from moeforge.plan.table import ROUTERS_SHARD
from moeforge.plan.translate import translate
from moeforge.plan.validate import validate_merge
from moeforge.train.stage import train_routers


@dataclass
class Build:
    root: Path
    plan: Plan
    model_dir: Path
    meta: dict[str, Path]


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def fetch_all(root: Path, refs: list[str]) -> dict[str, Path]:
    meta = {}
    for ref in dict.fromkeys(refs):
        slug = parse_ref(ref).slug
        meta[ref] = root / "resources" / slug / "meta"
        if not meta[ref].exists():
            fetch_metadata(ref, meta[ref])
    return meta


def plan_only(root: Path, recipe: dict[str, Any], merge: str = "m") -> Plan:
    """Fetch metadata and validate: everything that happens before any weight is read (the class check's
    summary is in results/{merge}/class_check.json)."""
    recipe_path = write_recipe(root / f"{merge}.yaml", recipe)
    refs = [recipe["base_model"], *(e["source_model"] for e in recipe["experts"]),
            *(e["source_model"] for e in recipe.get("shared_experts", []))]
    meta = fetch_all(root, refs)
    out = root / "results" / merge
    plan = validate_merge(merge, recipe_path, meta, out / "plan.json", out / "plan.tensors.tsv")
    translate(out / "plan.json", meta[recipe["base_model"]], out / "config")
    class_check(merge_check_settings(out / "plan.json", out / "plan.tensors.tsv", meta[recipe["base_model"]]),
                out / "class_check.json")
    return plan


def build(root: Path, recipe: dict[str, Any], merge: str = "m") -> Build:
    """All stages up to an assembled model directory."""
    plan = plan_only(root, recipe, merge)
    out = root / "results" / merge
    meta = {ref: root / "resources" / parse_ref(ref).slug / "meta" for ref in
            [recipe["base_model"], *(e["source_model"] for e in recipe["experts"]),
             *(e["source_model"] for e in recipe.get("shared_experts", []))]}
    weights = []
    for meta_dir in dict.fromkeys(meta.values()):
        model, cache = meta_dir.parent, meta_dir.parent / "sha256-cache.json"
        if not (model / "weights.json").exists():
            locate_weights(meta_dir / "source.json", model / "weights.json", cache)
        weights.append(out / "weights" / f"{model.name}.json")
        fetch_weights(model / "weights.json", weights[-1], cache)
    base_weights = meta[recipe["base_model"]].parent / "weights.json"
    gates_for_plan(out / "plan.json", base_weights, out / "gates.safetensors", out / "gates.json")
    paths = {shard: out / "shards" / f"{shard}.safetensors" for shard in plan.shards}
    digests = {}
    for shard in [s for s in plan.shards if s != ROUTERS_SHARD]:
        digests[shard] = shard_step(out / "plan.tensors.tsv", shard, weights, None, paths[shard],
                                    paths[shard].with_suffix(".sha256"))
    routers, training = out / "gates.safetensors", []
    if plan.recipe.router_training is not None:
        routers, training = out / "routers" / "trained.safetensors", [out / "routers" / "report.json"]
        train_routers(
            out / "plan.json", out / "plan.tensors.tsv", out / "gates.safetensors", [paths[s] for s in digests],
            out / "config", meta[recipe["base_model"]], routers, training[0], training[0].with_suffix(".md"),
            out / "routers" / "training.png")
    digests[ROUTERS_SHARD] = shard_step(out / "plan.tensors.tsv", ROUTERS_SHARD, weights, routers,
                                        paths[ROUTERS_SHARD], paths[ROUTERS_SHARD].with_suffix(".sha256"))
    assemble(out / "plan.json", [paths[s] for s in plan.shards], [digests[s] for s in plan.shards], out / "config",
             out / "class_check.json", meta[recipe["base_model"]], weights, out / "model", training)
    return Build(root=root, plan=plan, model_dir=out / "model", meta=meta)


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a model directory, by name."""
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    return out


def sha256_tree(model_dir: Path) -> dict[str, str]:
    from moeforge.io.files import sha256_file

    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file()}


def lock_of(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "moeforge.lock.json").read_text())


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a strictly loaded model (fails on any missing/unexpected/mismatched key)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{model_dir}: loading info {bad}"
    model.eval()
    with torch.no_grad():
        return model(ids).logits


_TF4_SCRIPT = (
    "import sys, json, torch\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True, torch_dtype=torch.float32)\n"
    "AutoTokenizer.from_pretrained(sys.argv[1])\n"
    "ids = torch.tensor(json.loads(sys.argv[2]))\n"
    "with torch.no_grad(): out = m.eval()(ids).logits\n"
    "print(json.dumps({'info': {k: len(v) for k, v in info.items()}, 'logits': out.tolist()}))\n"
)


def tf4_logits(tf4_python: Path, model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Load `model_dir` (model and tokenizer) strictly in the transformers 4.x interpreter; its logits."""
    import subprocess

    proc = subprocess.run([str(tf4_python), "-c", _TF4_SCRIPT, str(model_dir), json.dumps(ids.tolist())],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["info"] == {"missing_keys": 0, "unexpected_keys": 0, "mismatched_keys": 0, "error_msgs": 0}
    return torch.tensor(data["logits"])
