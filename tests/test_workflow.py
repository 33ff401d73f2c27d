"""The real Snakemake workflow, end to end, on the offline demo."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import logits, sha256_tree
from test_source_content import replace_keeping_times

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
MODEL = "results/demo/model"
STAGING = "results/demo/staging/model"
UNCOUNTED_NOTE = "moeforge: the step count leaves out each merge's shard jobs"


def workdir(tmp: Path, recipe: dict | None = None) -> Path:
    """A working directory with a config naming the demo recipe (or a given one)."""
    tmp.mkdir(parents=True, exist_ok=True)
    source = yaml.safe_load((REPO / "config/recipes/demo.yaml").read_text()) if recipe is None else recipe
    (tmp / "demo.yaml").write_text(yaml.safe_dump(source, sort_keys=False))
    (tmp / "config.yaml").write_text(yaml.safe_dump({"merges": {"demo": {"recipe": "demo.yaml"}}}))
    return tmp


def snakemake(wd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(wd), "--configfile", str(wd / "config.yaml"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    wd = workdir(tmp_path_factory.mktemp("demo"))
    proc = snakemake(wd, "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (wd / "first-run.stderr").write_text(proc.stderr)
    return wd


#: moeforge deploys as one pinned pip environment (envs/requirements.txt, what CI installs and
#: tests), not per-rule conda environments, so this lint is the one expected.
DEPLOYMENT_LINT = "Specify a conda environment or container for each rule."


def test_lint():
    proc = subprocess.run([*SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    text = proc.stdout + proc.stderr
    lints = {line.strip()[2:].rstrip(":") for line in text.splitlines() if line.strip().startswith("* ")}
    assert lints <= {DEPLOYMENT_LINT}, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_dry_run_shows_the_dag(tmp_path):
    proc = snakemake(workdir(tmp_path), "-n", "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rule in ("demo_models", "hash_source", "fetch_metadata", "validate", "locate_weights", "fetch_weights",
                 "translate_config", "assemble", "smoke_test", "publish"):
        assert rule in proc.stdout
    # The shard, gates and class check jobs (named by what the plan holds) are known once validate has run; the count
    # shown says it leaves them out, once, before it.
    lines = proc.stdout.splitlines()
    notes = [i for i, line in enumerate(lines) if line.startswith(UNCOUNTED_NOTE)]
    assert len(notes) == 1 and notes[0] < lines.index("Job stats:"), proc.stdout[:3000]


@pytest.mark.slow
def test_a_run_ends_with_a_summary_and_its_reports_hold_no_machine_paths(demo):
    summary = (demo / "first-run.stderr").read_text().split("moeforge summary", 1)[1].splitlines()
    assert summary[1:4] == ["demo:", "  model       results/demo/model/",
                            "  smoke test  passed (strict load, generation, comparison with the base)  "
                            "[results/demo/smoke/report.md]"]
    for name in ("report.json", "report.md"):
        text = (demo / "results/demo/smoke" / name).read_text()
        assert str(demo) not in text and str(REPO) not in text and "/tmp/" not in text


@pytest.mark.slow
def test_the_step_count_grows_by_the_jobs_it_said_it_left_out(demo):
    text = (demo / "first-run.stderr").read_text()
    assert text.count(UNCOUNTED_NOTE) == 1 and "its gates job and its class check job" in text
    totals = [int(total) for total in re.findall(r"^\d+ of (\d+) steps", text, re.MULTILINE)]
    shards = json.loads((demo / "results/demo/plan.json").read_text())["shards"]
    assert totals[-1] == totals[0] + len(shards) + 2, totals  # the demo's one gates job and one class check job


@pytest.mark.slow
def test_demo_builds_a_loadable_checked_model(demo):
    model = demo / MODEL
    report = json.loads((demo / "results/demo/smoke/report.json").read_text())
    assert report["passed"] is True
    load = report["load"]
    assert load["missing_keys"] == load["unexpected_keys"] == load["mismatched_keys"] == load["error_msgs"] == []
    assert load["tensors_scanned"] == 4 * (6 + 1 + 3 * 3) + 3  # per layer: attention+norms, router, 3 experts
    lock = json.loads((model / "moeforge.lock.json").read_text())
    actual = sha256_tree(model)
    actual.pop("moeforge.lock.json")
    assert lock["files"] == actual
    import torch

    out = logits(model, torch.tensor([[1, 5, 9, 200, 33]]))
    assert torch.isfinite(out).all()
    assert not (model / ".snakemake_timestamp").exists()
    assert not list((demo / "results").glob("**/shards/*.safetensors"))  # temp shards removed
    for png in ("expert_load.png", "gate_similarity.png"):
        assert (demo / "results/demo/smoke" / png).stat().st_size > 1000


@pytest.mark.slow
def test_the_demo_trains_its_routers_and_its_lock_holds_the_texts(demo):
    from moeforge.io.files import sha256_file

    out = demo / "results/demo"
    report = json.loads((out / "routers/report.json").read_text())
    assert report["settings"]["method"] == "layerwise" and len(report["layers"]) == 4
    assert all(row["heldout_after"]["all"] > row["heldout_before"]["all"] for row in report["layers"])
    assert (out / "routers/report.md").is_file() and (out / "routers/training.png").stat().st_size > 1000
    texts = {f"resources/demo/texts/{d}.txt" for d in ("code", "math", "cooking")}
    lock = json.loads((demo / MODEL / "moeforge.lock.json").read_text())
    assert {t["path"]: t["sha256"] for t in lock["train_texts"]} == {t: sha256_file(demo / t) for t in texts}
    summary = (demo / "first-run.stderr").read_text().split("moeforge summary", 1)[1]
    assert "  routers     trained (layerwise): held-out routing accuracy" in summary


@pytest.mark.slow
def test_the_checked_model_is_published_as_hard_links(demo):
    """model/ holds the staging model's files themselves (same inodes, no byte copied), and a copy of the lock,
    the publish step's own output; the smoke test read the staging model."""
    model, staging = demo / MODEL, demo / STAGING
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in staging.iterdir())
    for path in model.iterdir():
        linked = os.stat(path).st_ino == os.stat(staging / path.name).st_ino
        assert linked == (path.name != "moeforge.lock.json"), path.name
        assert path.read_bytes() == (staging / path.name).read_bytes()
    outcome = json.loads((demo / "logs/demo/smoke_test.json").read_text())
    assert outcome["passed"] is True and outcome["model_dir"] == STAGING


@pytest.mark.slow
def test_rerun_does_nothing(demo):
    before = sha256_tree(demo / MODEL)
    proc = snakemake(demo, "--cores", "2")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert sha256_tree(demo / MODEL) == before
    dry = snakemake(demo, "-n", "--cores", "2")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]


@pytest.mark.slow
def test_single_core_build_is_byte_identical(demo, tmp_path):
    wd = workdir(tmp_path)
    proc = snakemake(wd, "--cores", "1", f"{MODEL}/moeforge.lock.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sha256_tree(wd / MODEL) == sha256_tree(demo / MODEL)


def test_bad_recipe_fails_before_any_job(tmp_path):
    recipe = yaml.safe_load((REPO / "config/recipes/demo.yaml").read_text())
    recipe["experts_per_tok"] = recipe.pop("experts_per_token")
    wd = workdir(tmp_path, recipe)
    proc = snakemake(wd, "--cores", "2")
    assert proc.returncode != 0
    assert "experts_per_tok: unknown key 'experts_per_tok'; did you mean 'experts_per_token'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (wd / "resources").exists() and not (wd / "results").exists()


def test_bad_merge_name_fails(tmp_path):
    wd = workdir(tmp_path)
    (wd / "config.yaml").write_text(yaml.safe_dump({"merges": {"../escape": {"recipe": "demo.yaml"}}}))
    proc = snakemake(wd, "-n", "--cores", "1")
    assert proc.returncode != 0
    assert "'../escape' does not match" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_mistyped_path_under_the_demo_directory_is_named_by_moeforge(demo, tmp_path):
    """Only the demo's own models are the demo rule's outputs; another path beside them is a local path
    like any other, so a typo gets fetch_metadata's message instead of Snakemake's missing-input error."""
    recipe = yaml.safe_load((REPO / "config/recipes/demo.yaml").read_text())
    recipe["experts"][-1]["source_model"] = "resources/demo/expert_cookin"
    wd = workdir(tmp_path, recipe)
    shutil.copytree(demo / "resources/demo", wd / "resources/demo")
    proc = snakemake(wd, "--cores", "2")
    assert proc.returncode != 0
    assert "resources/demo/expert_cookin: no such local directory" in proc.stderr
    assert "MissingInputException" not in proc.stdout + proc.stderr
    assert not (wd / MODEL).exists()


@pytest.mark.slow
def test_model_problem_stops_at_validate_with_message(demo, tmp_path):
    """A missing expert tensor is reported by validate; no weights are fetched, no model appears."""
    wd = workdir(tmp_path)
    shutil.copytree(demo / "resources/demo", wd / "resources/demo")
    from safetensors.torch import load_file, save_file

    path = wd / "resources/demo/expert_math/model.safetensors"
    tensors = load_file(path)
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, path, metadata={"format": "pt"})
    proc = snakemake(wd, "--cores", "2")
    assert proc.returncode != 0
    assert "tensor 'model.layers.1.mlp.down_proj.weight' is missing from the weights" in proc.stderr
    assert "resources/demo/expert_math" in proc.stderr
    assert not (wd / MODEL).exists()
    assert not list((wd / "results").glob("*/weights/*.json"))  # no merge's weights were fetched


@pytest.mark.slow
def test_a_config_that_only_verifies_builds_nothing(demo, tmp_path):
    """Checking a downloaded model needs no merge: a config with only verify: plans the verify job alone."""
    (tmp_path / "only.yaml").write_text(yaml.safe_dump({"verify": {"downloaded": str(demo / MODEL)}}))
    proc = subprocess.run([*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "verify", "-n",
                           "--cores", "1", "--configfile", str(tmp_path / "only.yaml")],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _planned_rules(proc.stdout) == {"verify_model", "verify"}, proc.stdout[-3000:]


def _flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                    "model-00003-of-00003.safetensors", "config.json"])
def test_verify_detects_a_flipped_byte(demo, tmp_path, victim):
    """`snakemake verify` on a downloaded copy: passes intact, fails on one flipped byte, naming the file."""
    copy = tmp_path / "downloaded"
    shutil.copytree(demo / MODEL, copy)
    (demo / "verify.yaml").write_text(yaml.safe_dump({"merges": {"demo": {"recipe": "demo.yaml"}},
                                                      "verify": {"downloaded": str(copy)}}))
    args = ["--configfile", str(demo / "verify.yaml"), "--cores", "1", "verify"]
    ok = snakemake(demo, *args)
    assert ok.returncode == 0, ok.stderr[-3000:]
    report = json.loads((demo / "results/verify/downloaded/report.json").read_text())
    assert report["passed"] and report["lock"]["files_verified"] == 10
    assert report["lock"]["source_files_verified"] == 4  # the demo's sources, hashed again
    md = (demo / "results/verify/downloaded/report.md").read_text()
    assert md.startswith("# Verify ") and md.splitlines()[0].endswith(": PASS")
    assert "## Lock check\n\n- model files: all 10 match the sha256 the lock records" in md
    assert "- base: not compared" in md and "base: `None`" not in md
    assert "all 10 files match the lock; smoke test passed" in ok.stdout + ok.stderr
    size = (copy / victim).stat().st_size
    _flip_byte(copy / victim, size // 2)
    bad = snakemake(demo, *args)
    assert bad.returncode != 0
    assert f"{victim}: sha256 differs from the lock" in bad.stderr


@pytest.mark.slow
def test_html_report_holds_the_plots(demo, tmp_path):
    """`snakemake --report` gives one HTML page with both plots and their captions per merge."""
    import base64

    out = tmp_path / "report.html"
    proc = snakemake(demo, "--report", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = out.read_text()
    for png in ("expert_load.png", "gate_similarity.png"):
        encoded = base64.b64encode((demo / "results/demo/smoke" / png).read_bytes()).decode()
        assert encoded[:2000] in html, f"{png} is not embedded in the report"
    assert "Share of tokens each expert receives" in html
    # Each figure's verdict label holds this run's verdict and numbers, read from its report.
    report = json.loads((demo / "results/demo/smoke/report.json").read_text())
    assert f"passed; mean KL(base || merged) {report['comparison']['kl_mean']:.3g} nats" in html


@pytest.mark.slow
def test_eval_target_reports_every_model_and_reruns_identically(demo):
    """`snakemake eval`: the table, the figure and the JSON; a forced rerun gives the same bytes."""
    out = demo / "results/demo/eval"
    proc = snakemake(demo, "--cores", "2", "eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["perplexity"]) == ["base", "expert_code", "expert_math", "expert_cooking", "moe"]
    assert "| **moe / oracle** |" in (out / "report.md").read_text()
    assert (out / "perplexity.png").stat().st_size > 1000
    before = sha256_tree(out)
    proc = snakemake(demo, "--cores", "2", "eval", "--forcerun", "evaluate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluate" in proc.stdout + proc.stderr
    assert sha256_tree(out) == before


@pytest.mark.slow
@pytest.mark.gguf
def test_gguf_target_converts_and_checks_every_merge(demo, llamacpp_converter):
    """`snakemake gguf`: after the smoke test, an f16 GGUF that matches transformers; never in the default target."""
    out = demo / "results/demo/gguf"
    proc = snakemake(demo, "--cores", "2", "gguf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["checks"]["f32"]["next_token_agree"] == report["checks"]["f32"]["prompts"]
    assert sorted(p.name for p in out.iterdir()) == ["model-f16.gguf", "report.json", "report.md"]
    md = (out / "report.md").read_text()
    assert md.startswith("# GGUF (llama.cpp): PASS") and "# Smoke test: PASS" in md
    dry = snakemake(demo, "--cores", "2", "-n", "--forceall")
    assert "gguf_check" not in dry.stdout + dry.stderr


@pytest.mark.slow
def test_building_another_merge_of_the_same_models_leaves_the_first_finished(demo, tmp_path):
    """Building a second merge of the same models builds it whole and leaves the first finished, under
    Snakemake's default rerun triggers: each merge fetches its models after its own plan, and the models
    are neither fetched again nor hashed again (no per-model job, no job of the first merge). A deleted
    model is then published again from its staging model, with no shard or assembly redone."""
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd, symlinks=True)
    other = yaml.safe_load((wd / "demo.yaml").read_text()) | {"seed": 7}
    (wd / "other.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    (wd / "other-config.yaml").write_text(yaml.safe_dump({"merges": {"other": {"recipe": "other.yaml"}}}))
    cmd = [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(wd), "--cores", "2"]
    planned = subprocess.run([*cmd, "-n", "--configfile", str(wd / "other-config.yaml")], capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert "fetch_weights" in _planned_rules(planned.stdout), planned.stdout[-3000:]
    assert not _planned_rules(planned.stdout) & {"demo_models", "hash_source", "fetch_metadata", "locate_weights"}
    assert "output: results/demo/" not in planned.stdout, planned.stdout[-3000:]
    proc = subprocess.run([*cmd, "--configfile", str(wd / "other-config.yaml")], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((wd / "results/other/smoke/report.json").read_text())["passed"]
    assert "Nothing to be done" in snakemake(wd, "-n", "--cores", "2").stdout
    shutil.rmtree(wd / MODEL)
    dry = snakemake(wd, "-n", "--cores", "2")
    assert _planned_rules(dry.stdout) == {"publish", "all"}, dry.stdout[-3000:]
    again = snakemake(wd, "--cores", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(os.stat(p).st_ino == os.stat(wd / STAGING / p.name).st_ino
               for p in (wd / MODEL).glob("*.safetensors"))
    assert sha256_tree(wd / MODEL) == sha256_tree(demo / MODEL)


@pytest.mark.slow
def test_a_model_that_fails_its_smoke_test_is_not_published(demo, tmp_path):
    """A staging model that fails its smoke test: the job fails, nothing stands at model/, and the outcome log
    (kept, unlike the failed job's outputs) says why and where the failed model is."""
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd, symlinks=True)
    shutil.rmtree(wd / MODEL)
    for report in (wd / "results/demo/smoke").iterdir():
        report.unlink()
    from safetensors.torch import load_file, save_file

    shard = wd / STAGING / "model-00002-of-00003.safetensors"
    tensors = load_file(shard)
    name = next(k for k in sorted(tensors) if "q_proj" in k)
    tensors[name][0, 0] = float("nan")
    shard.unlink()
    save_file(tensors, shard, metadata={"format": "pt"})
    proc = snakemake(wd, "--cores", "2")
    assert proc.returncode != 0
    assert not (wd / MODEL).exists() and not (wd / "results/demo/smoke/report.json").exists()
    outcome = json.loads((wd / "logs/demo/smoke_test.json").read_text())
    assert outcome["passed"] is False and name in outcome["errors"][0]
    assert outcome["model_dir"] == STAGING and (wd / outcome["model_dir"] / "moeforge.lock.json").is_file()
    assert f"is not published; it stays in {STAGING}" in proc.stderr


@pytest.mark.slow
def test_a_source_replaced_keeping_its_timestamps_is_rebuilt_only_when_its_bytes_changed(demo, tmp_path):
    """Snakemake sees only mtimes; the workflow sees content. A byte-identical copy (new inode) reruns
    nothing; other bytes under the old size and mtime rebuild the merge, whose lock then records their sha256;
    and once the source changes again after the build, verify names the file."""
    wd = tmp_path / "wd"
    shutil.copytree(demo, wd, symlinks=True)
    source = wd / "resources/demo/expert_math/model.safetensors"
    built = {p.name: p.stat().st_ino for p in (wd / MODEL).iterdir()}
    replace_keeping_times(source, source.read_bytes())
    same = snakemake(wd, "--cores", "2")
    assert same.returncode == 0 and "Nothing to be done" in same.stdout + same.stderr, same.stdout[-3000:]
    assert {p.name: p.stat().st_ino for p in (wd / MODEL).iterdir()} == built

    data = bytearray(source.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data: the file stays a valid checkpoint
    replace_keeping_times(source, bytes(data))
    rebuilt = snakemake(wd, "--cores", "2")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert "resources/demo/expert_math: model.safetensors changed since the last run" in rebuilt.stdout + rebuilt.stderr
    lock = json.loads((wd / MODEL / "moeforge.lock.json").read_text())
    recorded = {f["sha256"] for s in lock["sources"].values() if s["ref"] == "resources/demo/expert_math"
                for f in s["files"]}
    assert recorded == {hashlib.sha256(bytes(data)).hexdigest()}
    assert sha256_tree(wd / MODEL) != sha256_tree(demo / MODEL)
    assert "Nothing to be done" in snakemake(wd, "-n", "--cores", "2").stdout

    (wd / "only.yaml").write_text(yaml.safe_dump({"verify": {"built": str(wd / MODEL)}}))

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run([*SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(wd), "verify", "--cores", "1",
                               "--configfile", str(wd / "only.yaml")], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300)

    assert verify().returncode == 0  # the check passes, and its report now stands
    data[-1] ^= 0x03
    replace_keeping_times(source, bytes(data))
    verify = verify()  # the source's stat tuple changed: the check runs again, though no model file did
    assert verify.returncode != 0
    assert ("1 source file(s) changed since the build: resources/demo/expert_math/model.safetensors: sha256 differs "
            "from the lock") in verify.stderr, verify.stderr[-3000:]


def _planned_rules(dry_run: str) -> set[str]:
    """The rules of a dry run's job table."""
    table = dry_run.split("Job stats:", 1)[1].split("\n\n", 1)[0] if "Job stats:" in dry_run else ""
    return {line.split()[0] for line in table.splitlines()[3:] if line.split() and line.split()[0] != "total"}
