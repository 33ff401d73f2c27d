"""Safe by default: no token in any output, no remote code, no escape from results/, full disks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hfcache import offline_env, populate
from moeforge.demo.tiny_models import build_demo, build_dense_model
from moeforge.errors import ModelError
from moeforge.io.fetch import fetch_metadata
from pipeline import build
from test_workflow import MODEL, REPO, SNAKEMAKE, workdir

FAKE_TOKEN = "hf_moeforgeFAKEtokenDoNotLeak0123456789"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def run(wd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(wd), "--configfile", str(wd / "config.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=900)


@pytest.mark.slow
def test_hub_models_offline_with_token_in_env(tmp_path):
    """The whole workflow on org/repo@rev references served by a populated HF cache, offline.

    The fake token set in the environment appears in no output, log or lock file.
    """
    demo = build_demo(tmp_path / "src")
    cache = tmp_path / "hub"
    for name in ("base", "expert_code", "expert_math"):
        populate(cache, f"acme/{name}", demo[name], COMMIT)
    recipe = {"base_model": "acme/base@main", "gate_mode": "cheap_embed", "experts": [
        {"source_model": "acme/expert_code", "positive_prompts": ["def f(x):"]},
        {"source_model": f"acme/expert_math@{COMMIT}", "positive_prompts": ["Solve 2x = 4"]}]}
    wd = workdir(tmp_path / "wd", recipe)
    env = {**offline_env(cache), "HF_TOKEN": FAKE_TOKEN}
    proc = run(wd, env, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lock = json.loads((wd / MODEL / "moeforge.lock.json").read_text())
    assert {s["resolved_revision"] for s in lock["sources"].values()} == {COMMIT}
    assert all(f["sha256"] for s in lock["sources"].values() for f in s["files"])
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    for path in wd.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_remote_code_is_never_run(tmp_path):
    """A config with auto_map pointing at custom code: moeforge uses the built-in class and never imports it."""
    model = build_dense_model(tmp_path / "m", "llama")
    marker = tmp_path / "remote_code_ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (model / "config.json").write_text(json.dumps(config))
    result = build(tmp_path / "b", {"base_model": str(model), "gate_mode": "hidden",
                                    "experts": [{"source_model": str(model), "positive_prompts": [p]}
                                                for p in ("hi", "bye")]})
    from moeforge.check.smoke import SmokeOptions, run_smoke

    run_smoke(result.model_dir, model, SmokeOptions(prompts=["hello"], max_new_tokens=2, identity=True))
    assert not marker.exists()
    assert result.plan.recipe.trust_remote_code is False


def test_bin_only_model_is_converted_safely(tmp_path):
    """pytorch_model*.bin only: loaded with weights_only=True, converted, then merged like any model."""

    import torch
    from safetensors.torch import load_file

    from pipeline import logits

    model = build_dense_model(tmp_path / "m", "llama", max_shard_size="200KB")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    renamed = {shard: f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin" for i, shard in enumerate(shards, start=1)}
    for shard, name in renamed.items():
        torch.save(load_file(model / shard), model / name)
        (model / shard).unlink()
    (model / "model.safetensors.index.json").unlink()
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert len(shards) > 1
    result = build(tmp_path / "b", {"base_model": str(model), "gate_mode": "random",
                                    "experts": [{"source_model": str(model)}] * 2})
    ids = torch.tensor([[1, 5, 9, 33]])
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (logits(result.model_dir, ids) - dense(ids).logits).abs().max() < 1e-5

    evil = tmp_path / "evil"
    shutil.copytree(model, evil)
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    first = renamed[shards[0]]
    torch.save({"model.embed_tokens.weight": Payload()}, evil / first)
    with pytest.raises(ModelError, match=f"cannot load {first} safely"):
        fetch_metadata(str(evil), tmp_path / "evil_meta")
    assert not marker.exists()


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.mark.slow
@pytest.mark.parametrize("readonly", [False, True], ids=["disk full", "read-only"])
def test_unwritable_results_give_one_message(tmp_path, readonly):
    wd = workdir(tmp_path / "wd")
    results = wd / "results"
    _mount_tmpfs(results, "96k", readonly)
    try:
        proc = run(wd, dict(__import__("os").environ), "--cores", "2")
        assert proc.returncode != 0
        if readonly:  # Snakemake itself refuses before any job, naming the directory
            assert "Read-only file system: 'results/demo'" in proc.stderr
        else:  # a shard job hits the full disk: moeforge's one line, naming the file and what to do
            assert re.search(r"ERROR moeforge: results/(demo/)?shards: No space left on device \(the file system of this "
                             r"job's outputs; [\d.]+ MiB free now\) -> free disk space", proc.stderr), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert not [p for p in results.rglob("*") if ".tmp-" in p.name]  # no partial output left behind
        assert not (results / "demo/model").exists()
        # finished work is kept: the metadata fetched before the failure, and (disk full) the plan
        assert len(list((wd / "resources/models").glob("*/meta/source.json"))) == 4
        assert readonly or (results / "demo/plan.json").is_file()
    finally:
        subprocess.run(["umount", str(results)], check=False)
