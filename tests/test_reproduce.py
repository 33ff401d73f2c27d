"""Rerun a published merge from its lock (`lock:` merges) and say whether the result is the same.

Two real-Snakefile runs: a rebuild from a local model directory and from a Hub repo served by an
offline cache (one run), and a changed local source stopping the rebuild before validation. The
rest goes through the library functions the rules call.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from hfcache import offline_env, populate
from moeforge.check.reproduce import reproduce
from moeforge.errors import FetchError, ModelError, RecipeError
from moeforge.io.lockfile import LOCK_NAME, read_lock, resolve_lock_ref
from moeforge.plan.lock_merge import merge_from_lock, pinned_recipe, write_lock_recipe
from moeforge.plan.published_merge import merge_from_published
from pipeline import build, sha256_tree

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
COMMITS = {"base": "1111111111111111111111111111111111111111", "e0": "2222222222222222222222222222222222222222",
           "e1": "3333333333333333333333333333333333333333"}
MERGED_COMMIT = "4444444444444444444444444444444444444444"


@pytest.fixture(scope="module")
def models(base_and_experts):
    return base_and_experts


def recipe_for(base: str, experts: list[str]) -> dict:
    return {"base_model": base, "gate_mode": "random", "experts": [{"source_model": e} for e in experts]}


@pytest.fixture(scope="module")
def original(models, tmp_path_factory):
    """A merge of local models, built in-process: the published model the tests rebuild."""
    root = tmp_path_factory.mktemp("original")
    return build(root, recipe_for(str(models["base"]), [str(models["e0"]), str(models["e1"])])).model_dir


def snakemake(wd: Path, merges: dict, env: dict | None = None, *args: str) -> subprocess.CompletedProcess:
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "cfg.yaml").write_text(yaml.safe_dump({"merges": merges}))
    return subprocess.run([*SNAKEMAKE, "-d", str(wd), "--configfile", str(wd / "cfg.yaml"), "--cores", "2", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=900)


def report_of(wd: Path, merge: str) -> dict:
    return json.loads((wd / "results" / merge / "reproduce" / "report.json").read_text())


def writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for path in dst.iterdir():
        path.chmod(0o644)
    return dst


# ---- the rebuild through the real workflow: a local model directory and a Hub repo --------------

@pytest.fixture(scope="module")
def hub_build(models, tmp_path_factory):
    """A merge of Hub models (one cache, offline), built in a subprocess, then published to the cache."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    for name, commit in COMMITS.items():
        populate(cache, f"acme/{name}", models[name], commit)
    recipe = recipe_for("acme/base", ["acme/e0@main", "acme/e1"])
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); from pathlib import Path; from pipeline import build; "
            f"build(Path({str(root / 'build')!r}), {recipe!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(cache), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = root / "build" / "results" / "m" / "model"
    populate(cache, "acme/merged", model, MERGED_COMMIT)
    return {"cache": cache, "model": model}


@pytest.fixture(scope="module")
def rebuilt(original, hub_build, tmp_path_factory):
    """One workflow run, offline, rebuilding both merges from their locks."""
    wd = tmp_path_factory.mktemp("rebuild")
    proc = snakemake(wd, {"again": {"lock": str(original)}, "hub": {"lock": "acme/merged"}},
                     offline_env(hub_build["cache"]))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return wd


def without_lock(tree: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in tree.items() if k != LOCK_NAME}


@pytest.mark.slow
def test_a_lock_rebuild_is_identical(rebuilt, original):
    report = report_of(rebuilt, "again")
    assert report["verdict"] == "identical" and report["compared_with"] == "published files"
    assert report["recorded_merge"] == "m" and report["warnings"] == [] and report["notes"] == []
    assert {f["status"] for f in report["files"]} == {"identical"}
    assert (rebuilt / "results/again/reproduce/report.md").read_text().startswith("# Reproduce again: identical")
    assert without_lock(sha256_tree(rebuilt / "results/again/model")) == without_lock(sha256_tree(original))
    assert json.loads((rebuilt / "results/again/smoke/report.json").read_text())["passed"] is True


@pytest.mark.slow
def test_a_hub_rebuild_pins_the_recorded_commits(rebuilt, hub_build):
    report = report_of(rebuilt, "hub")
    assert report["verdict"] == "identical" and report["compared_with"] == "published files"
    record = json.loads((rebuilt / "results/hub/reproduce/sources.json").read_text())
    assert record["pinned"] == {"acme/base": f"acme/base@{COMMITS['base']}",
                                "acme/e0@main": f"acme/e0@{COMMITS['e0']}", "acme/e1": f"acme/e1@{COMMITS['e1']}"}
    recipe = yaml.safe_load((rebuilt / "results/hub/reproduce/recipe.yaml").read_text())
    assert recipe["base_model"] == f"acme/base@{COMMITS['base']}"
    lock = read_lock(rebuilt / "results/hub/model" / LOCK_NAME)
    assert {s["ref"]: s["resolved_revision"] for s in lock["sources"].values()} == {
        f"acme/{name}@{commit}": commit for name, commit in COMMITS.items()}
    card = (hub_build["model"] / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["acme/base", "acme/e0", "acme/e1"]
    assert f"`acme/base@{COMMITS['base']}` (attention" in card and "## Reproduce" in card


# ---- what the report says about a difference ---------------------------------------------------

def test_a_changed_tensor_is_named_with_its_difference(original, tmp_path):
    published = writable_copy(original, tmp_path / "published")
    shard = sorted(published.glob("model-*.safetensors"))[1]
    with safe_open(str(shard), framework="pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        metadata = fh.metadata()
    victim = sorted(tensors)[-1]
    tensors[victim] = tensors[victim].clone()
    tensors[victim].view(-1)[:3] += 0.25
    save_file(tensors, shard, metadata=metadata)
    report = reproduce("again", str(published), original, tmp_path / "r.json", tmp_path / "r.md")
    assert report["verdict"] == "different"
    differing = [f for f in report["files"] if f["status"] != "identical"]
    assert [f["name"] for f in differing] == [shard.name]
    (tensor,) = report["tensors"]["differing"]
    assert tensor["tensor"] == victim and tensor["differing_elements"] == 3
    assert tensor["max_abs_diff"] == pytest.approx(0.25, rel=1e-3)
    assert any(shard.name in w and "does not match its own lock" in w for w in report["warnings"])
    markdown = (tmp_path / "r.md").read_text()
    assert markdown.startswith("# Reproduce again: different") and f"`{victim}` | 0.25 | 3 of " in markdown


def test_a_model_split_into_other_files_has_the_same_tensors(original, tmp_path):
    """A lock made by a version that sharded otherwise: every file differs, every tensor is the same."""
    published = writable_copy(original, tmp_path / "published")
    lock = json.loads((published / LOCK_NAME).read_text())
    tensors = {}
    for shard in sorted(published.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            tensors |= {name: fh.get_tensor(name) for name in fh.keys()}
        shard.unlink()
        del lock["files"][shard.name]
    (published / "model.safetensors.index.json").unlink()
    del lock["files"]["model.safetensors.index.json"]
    save_file(tensors, published / "model.safetensors", metadata={"format": "pt"})
    lock["files"]["model.safetensors"] = hashlib.sha256((published / "model.safetensors").read_bytes()).hexdigest()
    (published / LOCK_NAME).write_text(json.dumps(lock))
    report = reproduce("again", str(published), original, tmp_path / "r.json", tmp_path / "r.md")
    assert report["verdict"] == "same tensors"
    assert {f["status"] for f in report["files"] if _is_weight_file(f["name"])} == {"missing", "extra"}
    assert {f["status"] for f in report["files"] if not _is_weight_file(f["name"])} == {"identical"}
    assert report["tensors"] == {"tensors_compared": len(tensors), "differing": []}
    assert (tmp_path / "r.md").read_text().startswith("# Reproduce again: same tensors")
    # and a changed tensor in the other layout is still found by name
    tensors[sorted(tensors)[0]] = tensors[sorted(tensors)[0]] + 1
    save_file(tensors, published / "model.safetensors", metadata={"format": "pt"})
    lock["files"]["model.safetensors"] = hashlib.sha256((published / "model.safetensors").read_bytes()).hexdigest()
    (published / LOCK_NAME).write_text(json.dumps(lock))
    report = reproduce("again", str(published), original, tmp_path / "r.json", tmp_path / "r.md")
    assert report["verdict"] == "different"
    assert [t["tensor"] for t in report["tensors"]["differing"]] == [sorted(tensors)[0]]


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name == "model.safetensors.index.json"


def test_a_bare_lock_compares_hashes_only(original, tmp_path):
    lock = json.loads((original / LOCK_NAME).read_text())
    shard = sorted(name for name in lock["files"] if name.endswith(".safetensors"))[0]
    lock["files"][shard] = "0" * 64
    lock["files"]["extra-in-lock.json"] = lock["files"].pop("config.json")
    lock["libraries"]["torch"] = "0.0.1"
    (tmp_path / "old.lock.json").write_text(json.dumps(lock))
    report = reproduce("again", str(tmp_path / "old.lock.json"), original, tmp_path / "r.json", tmp_path / "r.md")
    status = {f["name"]: f["status"] for f in report["files"] if f["status"] != "identical"}
    assert status == {shard: "differs", "extra-in-lock.json": "missing", "config.json": "extra"}
    assert report["compared_with"] == "lock sha256"
    assert report["tensors"] is None
    assert "tensor by tensor" in report["notes"][0]
    assert report["warnings"] == [f"torch {torch.__version__} here, 0.0.1 when the merge was built"]


# ---- local sources are checked before any work -------------------------------------------------

@pytest.fixture
def edited(models, tmp_path):
    """A merge built from copies of the models; then one copy is edited in place (same size)."""
    sources = {name: writable_copy(models[name], tmp_path / "sources" / name) for name in ("base", "e0", "e1")}
    model = build(tmp_path / "build", recipe_for(str(sources["base"]), [str(sources["e0"]), str(sources["e1"])]))
    weights = sources["e1"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    return {"model": model.model_dir, "weights": weights}


@pytest.mark.slow
def test_a_changed_local_source_stops_before_validate(edited, tmp_path):
    wd = tmp_path / "wd"
    proc = snakemake(wd, {"again": {"lock": str(edited["model"])}})
    assert proc.returncode != 0
    assert f"{edited['weights']}: sha256 " in proc.stderr and "differ from the lock" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (wd / "results/again/plan.json").exists() and not (wd / "logs/again/validate.log").exists()


def test_a_changed_local_source_size_fails_when_parsed(edited, tmp_path):
    with open(edited["weights"], "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match=rf"{edited['weights']}: \d+ bytes, the lock records \d+"):
        merge_from_lock(str(edited["model"]))
    with pytest.raises(ModelError, match="differ from the lock"):
        write_lock_recipe(edited["model"] / LOCK_NAME, tmp_path / "recipe.yaml", tmp_path / "sources.json")
    assert not (tmp_path / "recipe.yaml").exists()


def test_the_recorded_recipe_is_used_as_it_is(original):
    lock = read_lock(original / LOCK_NAME)
    merge = merge_from_lock(str(original))
    assert merge.name == "m" and merge.ref.model_dir == original
    assert json.loads(json.dumps(merge.recipe.to_dict())) == lock["recipe"]
    assert pinned_recipe(lock)["base_model"] == lock["recipe"]["base_model"]


def test_the_card_names_local_sources_by_directory(original, models):
    card = (original / "README.md").read_text()
    assert "base_model" not in yaml.safe_load(card.split("---")[1])  # only Hub ids go there
    assert all(f"`{name}`" in card for name in ("base", "e0", "e1"))
    assert str(models["base"].parent) not in card
    assert "## Reproduce" in card and "lock: org/name@revision" in card


# ---- bad locks: one clear message each ---------------------------------------------------------

def bad_locks(original: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    lock = json.loads((original / LOCK_NAME).read_text())
    missing = {k: v for k, v in lock.items() if k not in ("files", "sources")}
    newer = {**lock, "moeforge_lock_version": 2}
    slug = next(iter(lock["sources"]))
    escaping = json.loads(json.dumps(lock))
    escaping["sources"][slug]["files"][0]["name"] = "/etc/passwd"
    dotdot = json.loads(json.dumps(lock))
    dotdot["sources"][slug]["files"][0]["name"] = "../other/model.safetensors"
    cases = {"missing": (missing, "not a complete moeforge lock: missing sources, files"),
             "newer": (newer, "written by a newer moeforge (moeforge_lock_version 2; this moeforge reads version 1)"),
             "not-json": (None, "not valid JSON: line 1 column 1"),
             "absolute": (escaping, f"a malformed lock: sources.{slug}.files: file name '/etc/passwd' is an "
                                    "absolute path"),
             "dotdot": (dotdot, f"a malformed lock: sources.{slug}.files: file name '../other/model.safetensors' "
                                "leaves the directory (..)"),
             "newline-merge": ({**lock, "merge": "demo\nrm -rf"}, "a malformed lock: merge 'demo\\nrm -rf' is not "
                                                                  "a merge name"),
             "newline-file": ({**lock, "files": {**lock["files"], "README.md\n": "0" * 64}},
                              "a malformed lock: files: file name 'README.md\\n' holds control characters")}
    out = {}
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.lock.json"
        path.write_text(json.dumps(data) if data is not None else "moeforge lock\n")
        out[name] = (path, message)
    return out


def test_bad_locks_are_one_message_each(original, tmp_path):
    for path, message in bad_locks(original, tmp_path).values():
        with pytest.raises(RecipeError) as info:
            merge_from_lock(str(path))
        assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value)
    with pytest.raises(FetchError, match="no such lock file or model directory"):
        resolve_lock_ref(str(tmp_path / "nowhere" / LOCK_NAME))
    with pytest.raises(FetchError, match=f"the directory holds no {LOCK_NAME}"):
        resolve_lock_ref(str(tmp_path))


@pytest.mark.parametrize("case", ["missing", "newer", "not-json", "absolute"])
def test_a_bad_lock_stops_the_workflow(original, tmp_path, case):
    path, message = bad_locks(original, tmp_path)[case]
    proc = snakemake(tmp_path / "wd", {"again": {"lock": str(path)}}, None, "-n")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count(message) == 1 and "Traceback" not in output
    assert not (tmp_path / "wd" / "results").exists()


def test_a_moeforge_merge_of_local_models_given_as_published_is_sent_to_its_lock(original):
    """Its card names the local models by name only; the lock is what records them, and says how to rebuild."""
    with pytest.raises(RecipeError) as info:
        merge_from_published(str(original))
    message = str(info.value)
    assert "local models that are not here (base, e0, e1)" in message
    assert message.endswith(f"rebuild it from its lock: lock: {original / 'moeforge.lock.json'}")
