"""Work that merges share is done once: shards keyed by what they hold, dense evaluation scores per model."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moeforge.check.evaluate import EvalOptions, evaluate
from moeforge.demo.tiny_models import DEMO_EXPERTS
from moeforge.errors import BuildError
from moeforge.gates.compute import compute_gates
from moeforge.gates.key import NOT_READ, gates_key, gates_recipe, gates_settings
from moeforge.io.domains import heldout_paths
from moeforge.io.files import dumps_json
from moeforge.io.refs import parse_ref
from moeforge.io.safetensors_file import read_header
from moeforge.plan.class_check import check_key, merge_check_settings, require_checked
from moeforge.plan.plan_json import read_plan
from moeforge.plan.recipe import RouterTraining
from moeforge.plan.table import ROUTERS_SHARD
from pipeline import build, logits, plan_only, sha256_tree
from test_workflow import REPO, snakemake


def recipe_of(models: dict[str, Path], **changes) -> dict:
    return {"base_model": str(models["base"]), "gate_mode": "random",
            "experts": [{"source_model": str(models["e0"])}, {"source_model": str(models["e1"])}], **changes}


def test_shard_keys_follow_what_a_shard_holds(base_and_experts, tmp_path):
    """Merges that differ only in gate mode and experts per token share every keyed shard; a changed plan row
    or a changed source gives the shards that hold it a new key, and only those."""
    keys = plan_only(tmp_path / "a", recipe_of(base_and_experts)).shard_keys
    plan = plan_only(tmp_path / "b", recipe_of(base_and_experts, gate_mode="uniform_random", experts_per_token=1))
    assert plan.shard_keys == keys and set(keys) == set(plan.shards) - {ROUTERS_SHARD}
    assert all(key.startswith(f"{shard}-") for shard, key in keys.items())

    noisy = recipe_of(base_and_experts)
    noisy["experts"][1]["noise_scale"] = 0.01
    changed = plan_only(tmp_path / "noisy", noisy).shard_keys
    layers = [shard for shard in keys if shard != "globals"]
    assert changed["globals"] == keys["globals"] and all(changed[s] != keys[s] for s in layers)

    # Same path, other bytes (one weight byte, the header as it was): the layers that read the expert change key.
    copy = shutil.copytree(base_and_experts["e1"], tmp_path / "e1")
    models = {**base_and_experts, "e1": copy}
    before = plan_only(tmp_path / "copy", recipe_of(models)).shard_keys
    assert before == keys  # a copy holds the same bytes: its shards are the original's
    weights = copy / "model.safetensors"
    start, _ = read_header(weights)
    data = bytearray(weights.read_bytes())
    data[start + 1] ^= 1
    weights.write_bytes(bytes(data))
    after = plan_only(tmp_path / "edited", recipe_of(models)).shard_keys
    assert after["globals"] == keys["globals"] and all(after[s] != keys[s] for s in layers)


def prompted(models: dict[str, Path], **changes) -> dict:
    """recipe_of with prompts, for the gate modes that read them."""
    experts = [{"source_model": str(models[e]), "positive_prompts": [text]}
               for e, text in (("e0", "def add(a, b):"), ("e1", "Heat the oil in a pan."))]
    return recipe_of(models, **{"gate_mode": "hidden", "experts": experts, **changes})


def test_gates_keys_follow_what_the_gates_are_computed_from(base_and_experts, tmp_path):
    """Merges that differ only in keys the gates do not read share their gates; another gate mode, other prompts
    or other base bytes give other gates; the same base at another path gives the same."""
    key = gates_key(plan_only(tmp_path / "a", prompted(base_and_experts)))
    same = prompted(base_and_experts, experts_per_token=1, sliding_window=64, rope_scaling="drop",
                    smoke_prompts=["Once upon a time"], max_new_tokens=4)
    assert gates_key(plan_only(tmp_path / "b", same)) == key
    assert gates_key(plan_only(tmp_path / "c", prompted(base_and_experts, gate_mode="hidden_avg"))) != key
    other_prompts = prompted(base_and_experts)
    other_prompts["experts"][1]["positive_prompts"] = ["Simmer the sauce."]
    assert gates_key(plan_only(tmp_path / "d", other_prompts)) != key
    copy = shutil.copytree(base_and_experts["base"], tmp_path / "base-copy")
    assert gates_key(plan_only(tmp_path / "e", prompted({**base_and_experts, "base": copy}))) == key
    weights = copy / "model.safetensors"
    start, _ = read_header(weights)
    data = bytearray(weights.read_bytes())
    data[start + 1] ^= 1
    weights.write_bytes(bytes(data))
    assert gates_key(plan_only(tmp_path / "f", prompted({**base_and_experts, "base": copy}))) != key


def test_the_keys_left_out_of_the_gates_key_cannot_change_the_gates(base_and_experts, tmp_path):
    """The gates computed from the full recipe, every left-out key away from its default, are the bytes the
    gates job computes from its settings (those keys at their defaults)."""
    plan = plan_only(tmp_path / "a", prompted(base_and_experts))
    full = replace(plan.recipe, experts_per_token=1, router_training=RouterTraining(method="end_to_end"),
                   smoke_prompts=("Once",), max_new_tokens=3, rope_scaling="drop", allow_rope_mismatch=True,
                   sliding_window=32, tie_word_embeddings="untie",
                   experts=tuple(replace(e, train_texts=("x.txt",)) for e in plan.recipe.experts))
    assert all(getattr(full, k) != getattr(gates_recipe(gates_settings(plan)), k) for k in NOT_READ)
    alone, _ = compute_gates(base_and_experts["base"], full, progress=False)
    shared, _ = compute_gates(base_and_experts["base"], gates_recipe(gates_settings(plan)), progress=False)
    assert alone.keys() == shared.keys() and all(torch.equal(alone[n], shared[n]) for n in alone)


def class_check_key(root: Path, recipe: dict) -> str:
    """The class check key of the merge ``m`` that plan_only validated under ``root``."""
    meta = root / "resources" / parse_ref(recipe["base_model"]).slug / "meta"
    return check_key(merge_check_settings(root / "results/m/plan.json", root / "results/m/plan.tensors.tsv", meta))


def test_class_check_keys_follow_the_config_and_the_shapes(base_and_experts, tmp_path):
    """Merges that differ in what neither the output config nor the planned shapes hold share one class check;
    another experts_per_token (a config field) or another expert count (shapes) gives another."""
    def key(name: str, recipe: dict) -> str:
        plan_only(tmp_path / name, recipe)
        return class_check_key(tmp_path / name, recipe)

    first = key("a", prompted(base_and_experts))
    assert key("b", prompted(base_and_experts, gate_mode="hidden_avg", smoke_prompts=["Once"])) == first
    assert key("c", prompted(base_and_experts, experts_per_token=1)) != first
    three = prompted(base_and_experts)
    three["experts"].append({"source_model": str(base_and_experts["e0"]), "positive_prompts": ["x = 1"]})
    assert key("d", three) != first


def test_assembly_refuses_a_config_other_than_the_one_checked(base_and_experts, tmp_path):
    """The record names the config it checked: a config.json edited after the check is refused, by name."""
    plan_only(tmp_path, recipe_of(base_and_experts))
    out = tmp_path / "results/m"
    require_checked(out / "config/config.json", out / "class_check.json")  # as translate_config wrote it
    config = json.loads((out / "config/config.json").read_text())
    (out / "config/config.json").write_text(json.dumps({**config, "num_local_experts": 3}))
    with pytest.raises(BuildError, match=r"config\.json: this config\.json is not the one checked.*delete it"):
        require_checked(out / "config/config.json", out / "class_check.json")


@pytest.fixture(scope="module")
def two_merges(tmp_path_factory) -> tuple[Path, str]:
    """The demo recipe (a), its variant with other gates and one expert per token (b), and its variant with one
    expert per token and untrained routers (c: the gates of a, the class check of b): c built first, then all
    three evaluated."""
    wd = tmp_path_factory.mktemp("two_merges")
    demo = yaml.safe_load((REPO / "config/recipes/demo.yaml").read_text())
    other = {**{k: v for k, v in demo.items() if k != "token_reduction"}, "gate_mode": "hidden", "experts_per_token": 1}
    untrained = {**{k: v for k, v in demo.items() if k != "router_training"}, "experts_per_token": 1,
                 "experts": [{k: v for k, v in e.items() if k != "train_texts"} for e in demo["experts"]]}
    for name, recipe in (("a", demo), ("b", other), ("c", untrained)):
        (wd / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (wd / "config.yaml").write_text(yaml.safe_dump({"merges": {m: {"recipe": f"{m}.yaml"} for m in "abc"}}))
    # c's model first: its gates and its class check are shared with merges listed before it (a; b), which
    # provide their settings, so the run must wait for their validation too. --notemp keeps the shards c shares
    # for a and b: each shard job still runs once in the two runs, and the second removes them when done.
    first = snakemake(wd, "--cores", "2", "--notemp", "results/c/staging/model/moeforge.lock.json")
    assert first.returncode == 0, first.stderr[-4000:]
    proc = snakemake(wd, "--cores", "2", "eval")  # a target after an option: --configfile takes several values
    assert proc.returncode == 0, proc.stderr[-4000:]
    return wd, first.stdout + first.stderr + proc.stdout + proc.stderr


def jobs_of(output: str, rule: str) -> int:
    return len(re.findall(rf"^(?:local)?rule {rule}:$", output, flags=re.MULTILINE))


@pytest.mark.slow
def test_two_merges_share_their_shards(two_merges, tmp_path, monkeypatch):
    wd, output = two_merges
    plans = {m: read_plan(wd / f"results/{m}/plan.json") for m in "abc"}
    keys = plans["a"].shard_keys
    assert plans["b"].shard_keys == keys and len(keys) == len(plans["a"].shards) - 1
    assert jobs_of(output, "shard") == len(keys) and jobs_of(output, "routers_shard") == 2 + 1
    # Every temporary shard removed, but c's routers: kept by the first run's --notemp, and no later job reads it.
    assert list((wd / "results").glob("**/shards/*.safetensors")) == [wd / "results/c/shards/routers.safetensors"]
    for index, shard in enumerate(plans["a"].shards, start=1):
        name = f"model-{index:05d}-of-{len(plans['a'].shards):05d}.safetensors"
        a, b = wd / "results/a/model" / name, wd / "results/b/model" / name
        # One file, hard-linked into both models (the routers differ: each merge has its own).
        assert (a.stat().st_ino == b.stat().st_ino) is (shard in keys), shard
    ids = torch.tensor([[1, 5, 9, 200, 33]])
    monkeypatch.chdir(wd)  # the recipes name the demo's models relative to the working directory
    for merge in "abc":
        logits(wd / f"results/{merge}/model", ids)  # strict load: no missing, unexpected or mismatched key
        alone = build(tmp_path / merge, yaml.safe_load((wd / f"{merge}.yaml").read_text()), merge=merge)
        assert sha256_tree(alone.model_dir) == sha256_tree(wd / f"results/{merge}/model"), merge


@pytest.mark.slow
def test_merges_with_one_config_share_one_class_check(two_merges):
    """b and c differ in gate mode and router training, not in their config or shapes: one class check for
    both; a (two experts per token) has its own. Each model's config.json is the one its record checked."""
    wd, output = two_merges
    records = {json.loads(p.read_text())["config_sha256"] for p in (wd / "results/class_checks").glob("*.json")}
    assert jobs_of(output, "class_check") == 2 and len(records) == 2
    for merge in "abc":
        config = wd / f"results/{merge}/model/config.json"
        assert hashlib.sha256(json.dumps(json.loads(config.read_text()), sort_keys=True).encode()).hexdigest() \
            in records, merge


@pytest.mark.slow
def test_dense_models_are_scored_once_for_both_merges(two_merges, monkeypatch):
    wd, output = two_merges
    assert jobs_of(output, "score_dense") == 1 + len(DEMO_EXPERTS) and jobs_of(output, "evaluate") == 3
    reports = {m: json.loads((wd / f"results/{m}/eval/report.json").read_text()) for m in "ab"}
    dense = ["base", *DEMO_EXPERTS]
    assert all(reports["a"]["perplexity"][m] == reports["b"]["perplexity"][m] for m in dense)
    assert reports["a"]["perplexity"]["moe"] != reports["b"]["perplexity"]["moe"]
    # The report is the one the evaluation gives in one process (in the working directory: it names the texts
    # relative to it).
    monkeypatch.chdir(wd)
    demo = wd / "resources/demo"
    alone = evaluate(wd / "results/a/model", demo / "base", {name: demo / name for name in DEMO_EXPERTS},
                     heldout_paths(), EvalOptions())
    assert dumps_json({**alone, "merge": "a"}) == dumps_json(reports["a"])


@pytest.mark.slow
def test_merges_that_differ_in_what_the_gates_do_not_read_share_them(two_merges):
    """a and c differ in experts per token and router training: one gates job for both, c's routers are those
    gates as they are, a's trained from them; b's other gate mode has its own."""
    wd, output = two_merges
    keys = {m: gates_key(read_plan(wd / f"results/{m}/plan.json")) for m in "abc"}
    assert keys["a"] == keys["c"] != keys["b"]
    assert jobs_of(output, "gates") == 2 and jobs_of(output, "train_routers") == 2
    gates = load_file(wd / f"results/gates/{keys['c']}.safetensors")
    model = {}
    for path in sorted((wd / "results/c/model").glob("model-*.safetensors")):
        model.update(load_file(path))
    routers = {name: tensor for name, tensor in model.items() if name.endswith("block_sparse_moe.gate.weight")}
    assert len(routers) == len(gates)
    assert all(torch.equal(routers[f"model.layers.{i}.block_sparse_moe.gate.weight"], gates[f"layer.{i}.router"])
               for i in range(len(routers)))
