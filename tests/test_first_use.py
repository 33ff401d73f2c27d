"""A new user's first runs: the run named is the run built, and the faults outside testing found.

Each test here failed before its fix: the demo built alongside a user's config, a mistyped local
path looked up on the Hub, a NaN in a source expert blamed on moeforge's transforms, a failed
model left where a finished one stands, an edited local source not noticed, published recipes
with empty prompts refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moeforge.build.finite import NonfiniteTally, nonfinite_counts
from moeforge.errors import BuildError, FetchError, ModelError, RecipeError
from moeforge.io.fetch import fetch_metadata
from moeforge.io.files import sha256_file
from moeforge.io.safetensors_file import OutTensor, write_safetensors
from moeforge.plan.merges import merges_to_build
from moeforge.plan.recipe import parse_recipe
from pipeline import build, fetch_all, plan_only, sha256_tree

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


@pytest.fixture(scope="module")
def models(base_and_experts):
    return base_and_experts


def recipe_for(models, **extra):
    return {"base_model": str(models["base"]), "gate_mode": "random",
            "experts": [{"source_model": str(models["e0"])}, {"source_model": str(models["e1"])}], **extra}


# ---- the run you name ----------------------------------------------------------------------

def dry_run(wd: Path, *args: str) -> str:
    """Jobs a dry run would run, from the repository's own config/config.yaml (as a user runs it)."""
    proc = subprocess.run([*SNAKEMAKE, "-d", str(wd), "-n", "--cores", "1", *args], cwd=REPO,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


@pytest.fixture
def wd(tmp_path):
    (tmp_path / "config").mkdir()
    shutil.copytree(REPO / "config", tmp_path / "config", dirs_exist_ok=True)
    return tmp_path


def test_a_user_config_builds_only_its_merges(wd, models):
    (wd / "mine.yaml").write_text(yaml.safe_dump(recipe_for(models)))
    (wd / "my.yaml").write_text(yaml.safe_dump({"merges": {"mine": {"recipe": str(wd / "mine.yaml")}}}))
    out = dry_run(wd, "--configfile", str(wd / "my.yaml"))
    assert "results/mine/" in out and "results/demo" not in out and "demo_models" not in out


def test_recipe_config_key_names_the_merge_after_the_file(wd, models):
    (wd / "my-moe.yaml").write_text(yaml.safe_dump(recipe_for(models)))
    out = dry_run(wd, "--config", f"recipe={wd / 'my-moe.yaml'}")
    assert "results/my-moe/" in out and "results/demo" not in out


def test_a_bare_run_builds_the_demo(wd):
    assert "demo_models" in dry_run(wd) and "results/demo/" in dry_run(wd)


def test_the_demo_runs_in_any_working_directory(tmp_path):
    """Its recipe ships with the workflow: an empty working directory (-d) plans the whole demo."""
    out = dry_run(tmp_path)
    assert "demo_models" in out and "results/demo/" in out


def test_merge_table_rules():
    demo = {"demo": {"recipe": "config/recipes/demo.yaml"}}
    assert merges_to_build({"merges": {}, "demo": demo["demo"]}) == demo
    assert merges_to_build({"merges": {}, "recipe": "a/b/x_1.yaml", "demo": demo["demo"]}) == {
        "x_1": {"recipe": "a/b/x_1.yaml"}}
    with pytest.raises(RecipeError, match="cannot name a merge"):
        merges_to_build({"recipe": "my recipe.yaml", "demo": demo["demo"]})
    with pytest.raises(RecipeError, match="named twice"):
        merges_to_build({"recipe": "x.yaml", "merges": {"x": {"recipe": "other.yaml"}}, "demo": demo["demo"]})


# ---- local paths are never Hub lookups, local files are tracked ------------------------------

def test_mistyped_local_path_is_not_a_hub_lookup(tmp_path, models, monkeypatch):
    shutil.copytree(models["e0"], tmp_path / "models" / "expert")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FetchError, match=r"no such local directory \./modles/expert, but the local model "
                                         r"models/expert exists.*modles/expert@main"):
        fetch_metadata("modles/expert", tmp_path / "meta")
    with pytest.raises(FetchError, match=r"no such local directory: .*models/exprt.*did you mean models/expert"):
        fetch_metadata("./models/exprt", tmp_path / "meta")
    assert not (tmp_path / "meta").exists()


@pytest.mark.parametrize("typo", ["models/bsae", "./models/bsae", "models/expret"])
def test_a_dry_run_catches_a_mistyped_local_path(wd, models, typo):
    """When the workflow is read: a dry run names the typo and the directory meant, as the real run would."""
    shutil.copytree(models["base"], wd / "models" / "base")
    shutil.copytree(models["e0"], wd / "models" / "expert")
    recipe = {"base_model": "models/base", "gate_mode": "random",
              "experts": [{"source_model": "models/expert"}, {"source_model": typo}]}
    (wd / "m.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([*SNAKEMAKE, "-d", str(wd), "-n", "--cores", "1", "--config", "recipe=m.yaml"], cwd=REPO,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode != 0
    meant = "models/base" if "bsae" in typo else "models/expert"
    output = proc.stdout + proc.stderr
    assert f"{typo}: no such local directory" in output and meant in output, output[-2000:]
    assert not (wd / "resources").exists()


def offline_fetch(tmp_path: Path, ref: str) -> subprocess.CompletedProcess:
    """``fetch_metadata(ref)`` in a process of its own, offline, with an empty Hugging Face cache."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = f"from pathlib import Path; from moeforge.io.fetch import fetch_metadata; fetch_metadata({ref!r}, Path('meta'))"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def test_missing_hub_ref_names_both_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = offline_fetch(tmp_path, "nobody/nothing")
    assert proc.returncode != 0
    assert "not in the Hugging Face cache" in proc.stderr and "no local directory ./nobody/nothing" in proc.stderr
    assert "for a local model, fix the path" in proc.stderr


def test_a_revision_on_a_local_directory_and_an_empty_revision_are_named(tmp_path, models, monkeypatch):
    shutil.copytree(models["e0"], tmp_path / "models" / "expert")
    monkeypatch.chdir(tmp_path)
    proc = offline_fetch(tmp_path, "models/expert@main")
    assert proc.returncode != 0
    assert "./models/expert is a local directory, but a local model takes no @revision (drop '@main')" in proc.stderr
    with pytest.raises(FetchError, match=r"no such local directory: .*nobody/nothing@ -> write a revision after '@'"):
        fetch_metadata("nobody/nothing@", tmp_path / "meta")


def test_local_source_edited_in_place_reruns(wd, models):
    """Overwriting a weight file (directory mtime unchanged) makes the plan out of date."""
    local = wd / "models"
    for key in ("base", "e0", "e1"):
        shutil.copytree(models[key], local / key)
    recipe = {"base_model": "models/base", "gate_mode": "random",
              "experts": [{"source_model": "models/e0"}, {"source_model": "models/e1"}]}
    (wd / "m.yaml").write_text(yaml.safe_dump(recipe))
    args = ["--config", "recipe=m.yaml"]
    proc = subprocess.run([*SNAKEMAKE, "-d", str(wd), "--cores", "1", "results/m/plan.json", *args], cwd=REPO,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in dry_run(wd, "results/m/plan.json", *args)
    weights = local / "e1" / "model.safetensors"
    dir_mtime = os.stat(local / "e1").st_mtime_ns
    tensors = load_file(weights)
    save_file({k: v * 2 for k, v in tensors.items()}, weights.with_suffix(".tmp"), metadata={"format": "pt"})
    with open(weights, "r+b") as fh:  # in place: the directory entry, and its mtime, do not change
        fh.write(weights.with_suffix(".tmp").read_bytes())
    weights.with_suffix(".tmp").unlink()
    os.utime(local / "e1", ns=(dir_mtime, dir_mtime))
    assert "fetch_metadata" in dry_run(wd, "results/m/plan.json", *args)


# ---- non-finite sources and failed models ---------------------------------------------------

def poisoned_copy(src: Path, dst: Path, name_part: str) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    victim = next(k for k in sorted(tensors) if name_part in k)
    tensors[victim] = tensors[victim].clone()
    tensors[victim].view(-1)[3] = float("nan")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return victim


def test_nan_in_a_source_expert_is_named_before_assembly(tmp_path, models):
    victim = poisoned_copy(models["e1"], tmp_path / "bad_expert", "layers.1.mlp.up_proj")
    recipe = recipe_for(models)
    recipe["experts"][1]["source_model"] = str(tmp_path / "bad_expert")
    with pytest.raises(ModelError) as info:
        build(tmp_path / "run", recipe)
    message = str(info.value)
    assert f"source tensor {victim!r}" in message and str(tmp_path / "bad_expert" / "model.safetensors") in message
    assert "1 NaN/inf" in message and "re-download" in message
    run = tmp_path / "run" / "results" / "m"
    assert not (run / "model").exists() and not list((run / "shards").glob("layers-*.safetensors"))


def relabelled_copy(src: Path, dst: Path, tensor: str, dtype: str) -> Path:
    """A copy of a single-file model whose header declares ``tensor`` as ``dtype`` (same item size, same bytes)."""
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header[tensor]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size:])
    return dst


@pytest.fixture(scope="module")
def half_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A float16 and a bfloat16 base, each with an expert fine-tuned from it (MLP changed by about 1 %)."""
    from moeforge.demo.tiny_models import build_dense_model

    root = tmp_path_factory.mktemp("half")
    out = {}
    for dtype in ("float16", "bfloat16"):
        base = build_dense_model(root / f"{dtype}-base", "llama", dtype=dtype, tokenizer_dir=tokenizer_dir)
        out[dtype] = base
        out[f"{dtype}-expert"] = build_dense_model(root / f"{dtype}-expert", derive_from=base, seed=3, mlp_noise=3e-3)
    return out


def _scale_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "times that of the base's" in r.getMessage()]


VICTIM = "model.layers.1.mlp.down_proj.weight"


def test_a_float16_expert_relabelled_bfloat16_is_refused_naming_the_tensor(tmp_path, half_models):
    """float16 bytes read as bfloat16 decode to 1e-7 and less: a near-zero expert, which the smoke test passed."""
    bad = relabelled_copy(half_models["float16-expert"], tmp_path / "relabelled", VICTIM, "BF16")
    recipe = {"base_model": str(half_models["float16"]), "gate_mode": "random",
              "experts": [{"source_model": str(half_models["float16-expert"])}, {"source_model": str(bad)}]}
    with pytest.raises(ModelError) as info:
        build(tmp_path / "run", recipe)
    message = str(info.value)
    assert message.startswith(f"{bad / 'model.safetensors'}: expert tensor {VICTIM!r} of model local--relabelled--")
    found = re.search(rf"has RMS ([0-9.e+-]+), ([0-9.e+-]+) times that of the base's {re.escape(repr(VICTIM))} "
                      r"\(RMS ([0-9.e+-]+)\)", message)
    assert found, message
    expert_rms, ratio, base_rms = map(float, found.groups())
    assert expert_rms < 1e-5 and 0.005 < base_rms < 1 and ratio == pytest.approx(expert_rms / base_rms, rel=1e-2)
    assert "a BF16 dtype in its safetensors header may be wrong" in message
    shards = tmp_path / "run" / "results" / "m" / "shards"
    assert not list(shards.glob("layers-*.safetensors")) and not (tmp_path / "run" / "results" / "m" / "model").exists()


def test_a_bfloat16_expert_relabelled_float16_is_warned_about(tmp_path, half_models, caplog):
    """The reverse relabel reads values near 1 against a base's 0.02: far off, named in a warning."""
    bad = relabelled_copy(half_models["bfloat16-expert"], tmp_path / "relabelled", VICTIM, "F16")
    recipe = {"base_model": str(half_models["bfloat16"]), "gate_mode": "random",
              "experts": [{"source_model": str(half_models["bfloat16-expert"])}, {"source_model": str(bad)}]}
    with caplog.at_level("WARNING"):
        build(tmp_path / "run", recipe)
    warnings = _scale_warnings(caplog)
    assert len(warnings) == 1 and f"expert tensor {VICTIM!r} of model local--relabelled--" in warnings[0], warnings


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_an_ordinary_fine_tuned_expert_passes_the_scale_check_silently(tmp_path, half_models, dtype, caplog):
    recipe = {"base_model": str(half_models[dtype]), "gate_mode": "random",
              "experts": [{"source_model": str(half_models[f"{dtype}-expert"])}, {"source_model": str(half_models[dtype])}]}
    with caplog.at_level("WARNING"):
        built = build(tmp_path, recipe)
    assert built.model_dir.is_dir() and _scale_warnings(caplog) == []
    rows = (tmp_path / "results" / "m" / "plan.tensors.tsv").read_text().splitlines()
    referenced = [r for r in rows[1:] if r.split("\t")[-1]]
    assert len(referenced) == 3 * 4  # the expert's three MLP matrices of four layers; the base's own need none
    assert all(r.split("\t")[-1].endswith("/model.safetensors/" + r.split("\t")[5]) for r in referenced)


def test_sampled_rms_reads_blocks_of_a_large_tensor_and_all_of_a_small_one(tmp_path):
    from safetensors.torch import save_file as save

    from moeforge.build.scales import SAMPLE_BYTES, sampled_rms
    from moeforge.io.safetensors_file import read_header

    generator = torch.Generator().manual_seed(0)
    big = torch.randn(SAMPLE_BYTES, generator=generator) * 0.02  # four times SAMPLE_BYTES of float32
    small = torch.randn(1000, generator=generator).to(torch.bfloat16)
    save({"big": big, "small": small}, tmp_path / "t.safetensors")
    start, entries = read_header(tmp_path / "t.safetensors")
    for name, tensor, rel in (("big", big, 2e-2), ("small", small, 1e-6)):
        exact = tensor.double().square().mean().sqrt().item()
        assert sampled_rms(tmp_path / "t.safetensors", start + entries[name].begin, entries[name]) == pytest.approx(
            exact, rel=rel)


def test_a_transform_overflow_is_blamed_on_the_transform(tmp_path, models):
    recipe = recipe_for(models, dtype="float16")
    recipe["experts"][0]["residual_scale"] = 1e9
    with pytest.raises(BuildError, match="not in its source tensors: a scale, noise or cast overflowed"):
        build(tmp_path, recipe)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.float8_e5m2, torch.float8_e4m3fn])
def test_scan_counts_nonfinite_values_and_hashes(tmp_path, dtype):
    good = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    bad = good.clone()
    bad[0, 1], bad[2, 3], bad[1, 0] = float("nan"), float("inf"), float("-inf")
    good, bad = good.to(dtype), bad.to(dtype)
    expected = 1 if dtype == torch.float8_e4m3fn else 3  # E4M3 has no inf: torch saturates it to +-448
    code = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3"}[dtype]
    tensors = [OutTensor(name, dtype_code, tuple(t.shape), t.numel() * t.element_size(),
                         produce=lambda t=t: t.reshape(-1).view(torch.uint8).numpy().tobytes())
               for name, dtype_code, t in (("a", code, good), ("b", code, bad), ("i", "I64", torch.arange(5)))]
    tally = NonfiniteTally()
    digest = write_safetensors(tmp_path / "x.safetensors", tensors, scan=tally.scan)
    assert digest == sha256_file(tmp_path / "x.safetensors") and tally.bad == {"b": expected}
    assert nonfinite_counts(tmp_path / "x.safetensors") == {"b": expected}
    assert torch.equal(load_file(tmp_path / "x.safetensors")["b"].float().nan_to_num(), bad.float().nan_to_num())


def test_a_model_that_fails_its_checks_stays_where_its_outcome_says(tmp_path, models, monkeypatch):
    """The smoke test moves nothing: the failed model stays where it was built, and the outcome record (a log,
    kept when the job fails) gives the failure and that place, relative to the working directory."""
    from moeforge.check.smoke_stage import smoke_stage

    result = build(tmp_path, recipe_for(models))
    out = tmp_path / "results" / "m"
    shard = next(result.model_dir.glob("model-*.safetensors"))
    tensors = load_file(shard)
    name = next(k for k in sorted(tensors) if "q_proj" in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    shard.unlink()
    save_file(tensors, shard, metadata={"format": "pt"})
    before = sha256_tree(result.model_dir)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=f"1 tensor.s. contain NaN or Inf, e.g. {name}"):
        smoke_stage(result.model_dir, out / "plan.json", out / "gates.json", out / "config" / "translation.json",
                    result.meta[str(models["base"])].parent / "weights.json", device="cpu",
                    max_new_tokens=2, out_json=out / "smoke/report.json", out_md=out / "smoke/report.md",
                    load_png=out / "smoke/load.png", similarity_png=out / "smoke/sim.png",
                    outcome_json=tmp_path / "logs/smoke_test.json")
    assert sha256_tree(result.model_dir) == before
    outcome = json.loads((tmp_path / "logs/smoke_test.json").read_text())
    assert outcome["passed"] is False and outcome["model_dir"] == "results/m/model"
    assert name in outcome["errors"][0]
    assert not (out / "smoke/report.json").exists() and not (out / "failed").exists()


# ---- prompts: mergekit-moe's rules, and the base's context ----------------------------------

def hidden_recipe(models, prompts0, prompts1):
    return {"base_model": str(models["base"]), "gate_mode": "hidden",
            "experts": [{"source_model": str(models["e0"]), "positive_prompts": prompts0},
                        {"source_model": str(models["e1"]), "positive_prompts": prompts1}]}


def test_empty_and_whitespace_prompts_are_accepted(tmp_path, models):
    """As mergekit-moe: the bos token alone gives an empty prompt's vector."""
    plan = plan_only(tmp_path, hidden_recipe(models, [""], ["  ", "def f(x):"]))
    assert plan.recipe.experts[0].positive_prompts == ("",)


@pytest.mark.parametrize("prompts", [["same"], [""], [" "]])
def test_identical_prompts_for_every_expert_are_refused(prompts):
    data = {"base_model": "a/b", "experts": [{"source_model": "x/y", "positive_prompts": prompts},
                                             {"source_model": "x/z", "positive_prompts": prompts}]}
    with pytest.raises(RecipeError, match=r"r.yaml: experts: all 2 experts have identical prompts"):
        parse_recipe(data, "r.yaml")


def test_a_prompt_longer_than_the_base_context_is_refused_at_validation(tmp_path, models):
    limit = json.loads((models["base"] / "config.json").read_text())["max_position_embeddings"]
    long_prompt = " ".join(["hello world"] * limit)
    with pytest.raises(RecipeError, match=rf"experts\[1\].*positive_prompts\[0\] is \d+ tokens long as the gates "
                                          rf"read it .*, more than the base model's max_position_embeddings \({limit}\)"):
        plan_only(tmp_path, hidden_recipe(models, ["short"], [long_prompt]))
    assert not (tmp_path / "results" / "m" / "plan.json").exists()


def test_smoke_prompts_and_new_tokens_past_the_positions_are_refused_at_validation(tmp_path, models):
    """In every gate mode: a smoke prompt longer than the base's positions (it passed the smoke test before),
    and one that the recipe's max_new_tokens takes past them."""
    limit = json.loads((models["base"] / "config.json").read_text())["max_position_embeddings"]
    too_long = recipe_for(models, smoke_prompts=["ok", " ".join(["hello world"] * limit)])
    with pytest.raises(RecipeError, match=rf"smoke_prompts\[1\]: the prompt is \d+ tokens, more than the base "
                                          rf"model's max_position_embeddings \({limit}\)"):
        plan_only(tmp_path / "a", too_long)
    generous = recipe_for(models, smoke_prompts=["hello world"], max_new_tokens=limit)
    with pytest.raises(RecipeError, match=r"smoke_prompts\[0\]: the prompt is \d+ tokens and max_new_tokens "
                                          rf"{limit}, more than .* -> shorten it by at least \d+ token\(s\) or lower "
                                          "max_new_tokens"):
        plan_only(tmp_path / "b", generous)


def test_the_smoke_tests_new_tokens_past_the_positions_are_refused_before_any_model_is_read(tmp_path, models):
    """smoke.max_new_tokens comes from the workflow config: the smoke test refuses it first (100000000 generated
    until the job was killed)."""
    from moeforge.check.smoke import SmokeOptions, run_smoke

    result = build(tmp_path, recipe_for(models))
    limit = json.loads((result.model_dir / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(RecipeError) as info:
        run_smoke(result.model_dir, None, SmokeOptions(prompts=["hello world"], max_new_tokens=100_000_000))
    assert info.value.where == "smoke.max_new_tokens"
    assert f"past the model's max_position_embeddings ({limit})" in info.value.what
    assert info.value.fix.startswith("set max_new_tokens to at most ")


def test_the_prompt_check_names_the_prompt_and_the_tokenizer(tmp_path, models):
    """The validate job's token check (moeforge.plan.prompt_check) says which prompt to shorten and by how much,
    and names a base whose tokenizer cannot be read."""
    from moeforge.plan.prompt_check import check_token_inputs

    limit = json.loads((models["base"] / "config.json").read_text())["max_position_embeddings"]
    recipe = parse_recipe(hidden_recipe(models, ["short"], [" ".join(["hi"] * 2 * limit)]))
    base_meta = fetch_all(tmp_path, [str(models["base"])])[str(models["base"])]
    with pytest.raises(RecipeError) as info:
        check_token_inputs(recipe, base_meta)
    assert info.value.where.startswith("experts[1]") and info.value.fix.startswith("shorten it by at least ")
    with pytest.raises(ModelError) as info:
        check_token_inputs(recipe, tmp_path / "no-such-model")
    assert info.value.where == str(tmp_path / "no-such-model") and "tokenizer" in info.value.what


def test_ill_conditioned_router_warns_like_mergekit(tmp_path, models):
    from moeforge.gates.compute import ILL_CONDITIONED

    """Two of three experts share their prompts (allowed: not all do), so their router rows coincide."""
    recipe = hidden_recipe(models, ["The cat sat on the mat"], ["def add(a, b): return a + b"])
    recipe["experts"].append(dict(recipe["experts"][0]))
    result = build(tmp_path, recipe)
    gates = json.loads((tmp_path / "results" / "m" / "gates.json").read_text())
    worst = max(layer["condition_number"] for layer in gates["layers"])
    assert worst > ILL_CONDITIONED
    assert any("ill-conditioned" in w for w in gates["warnings"])
    assert result.model_dir.is_dir()


# ---- warnings a user wants ------------------------------------------------------------------

def test_one_expert_merge_warns(tmp_path, models):
    recipe = recipe_for(models, experts_per_token=1)
    recipe["experts"] = recipe["experts"][:1]
    plan = plan_only(tmp_path, recipe)
    assert any("one expert" in w for w in plan.warnings)


def test_expert_without_tokenizer_files_warns(tmp_path, models):
    bare = tmp_path / "bare"
    shutil.copytree(models["e1"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    recipe = recipe_for(models)
    recipe["experts"][1]["source_model"] = str(bare)
    plan = plan_only(tmp_path / "run", recipe)
    assert any(str(bare) in w and "vocabulary was skipped" in w for w in plan.warnings)


def test_warnings_reach_the_console_and_the_validate_log(wd, models):
    """A one-expert merge, an expert without a tokenizer, a base whose index names a missing shard: each
    warning is on the console and in logs/<merge>/validate.log, not only in plan.json."""
    local = wd / "models"
    shutil.copytree(models["base"], local / "base")
    names = list(load_file(local / "base" / "model.safetensors"))
    weight_map = {name: "model.safetensors" for name in names} | {names[0]: "model-00002-of-00002.safetensors"}
    (local / "base" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copytree(models["e1"], local / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (local / "bare" / name).unlink(missing_ok=True)
    recipe = {"base_model": "models/base", "gate_mode": "random", "experts_per_token": 1,
              "experts": [{"source_model": "models/bare"}]}
    (wd / "m.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([*SNAKEMAKE, "-d", str(wd), "--cores", "1", "results/m/plan.json", "--config",
                           "recipe=m.yaml"], cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = ["the merge has one expert (bare)", "vocabulary was skipped",
                "model.safetensors.index.json names model-00002-of-00002.safetensors, which the model does not "
                "have (1 tensor(s) listed there)"]
    log = (wd / "logs" / "m" / "validate.log").read_text()
    for text in expected:
        assert text in proc.stderr and text in log, text
    assert any(expected[2] in w for w in json.loads((wd / "results/m/plan.json").read_text())["warnings"])


# ---- faults found by outside testing: late errors of early faults ---------------------------

def test_an_empty_prompt_reaches_the_smoke_test_as_the_bos_token(tmp_path, models):
    """mergekit-moe reads "" as the bos token alone, and so do the gates; the smoke test, which tokenizes
    as a user's ``tokenizer(text)`` (here: no bos added), failed after the whole build."""
    from transformers import AutoTokenizer

    from moeforge.check.smoke_stage import smoke_stage
    from moeforge.plan.prompts import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(models["base"])
    assert tokenizer("")["input_ids"] == [] and prompt_ids(tokenizer, "") == [tokenizer.bos_token_id]
    result = build(tmp_path, hidden_recipe(models, [""], ["def f(x):"]))
    out = tmp_path / "results" / "m"
    report = smoke_stage(result.model_dir, out / "plan.json", out / "gates.json", out / "config" / "translation.json",
                         result.meta[str(models["base"])].parent / "weights.json", device="cpu", max_new_tokens=2,
                         out_json=out / "smoke/report.json", out_md=out / "smoke/report.md",
                         load_png=out / "smoke/load.png", similarity_png=out / "smoke/sim.png",
                         outcome_json=out / "smoke_test.json")
    assert report["passed"] and [g["prompt"] for g in report["generations"]][0] == ""


def test_a_prompt_without_tokens_is_refused_at_validation_in_every_gate_mode(tmp_path, models):
    """A tokenizer without a bos token reads "" as nothing: refused by validation, by recipe key, even where
    the gates read no prompt (random), since the smoke test runs every expert prompt."""
    base = tmp_path / "base-without-bos"
    shutil.copytree(models["base"], base)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).is_file():
            data = json.loads((base / name).read_text())
            data.pop("bos_token", None)
            (base / name).write_text(json.dumps(data))
    data = {**recipe_for(models), "base_model": str(base)}
    data["experts"][1]["positive_prompts"] = ["", "text"]
    with pytest.raises(RecipeError) as info:
        plan_only(tmp_path, data)
    assert info.value.where == "experts[1].positive_prompts[0]" and "gives no tokens" in info.value.what
    assert not (tmp_path / "results" / "m" / "plan.json").exists()


def test_a_whole_number_written_as_a_float_is_an_integer(tmp_path, models):
    """JSON Schema (and mergekit-moe) take ``experts_per_token: 2.0``; transformers' config classes refuse a
    float, which failed the gates job after the weights were read."""
    plan = plan_only(tmp_path, recipe_for(models, experts_per_token=2.0, seed=7.0))
    assert plan.recipe.experts_per_token == 2 and type(plan.recipe.experts_per_token) is int
    assert '"experts_per_token": 2,' in (tmp_path / "results" / "m" / "plan.json").read_text()
    with pytest.raises(RecipeError, match=r"experts_per_token: 2.5 is not of type 'integer'"):
        parse_recipe(recipe_for(models, experts_per_token=2.5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_torch_lacks_is_named_before_any_weight_is_read(tmp_path, models):
    from moeforge.gates.compute import gates_for_plan
    from moeforge.runtime.devices import require_device

    with pytest.raises(RecipeError, match=r"smoke.device: the device 'cuda' is not usable here: this job's .*-> set smoke.device: cpu"):
        require_device("cuda", "smoke.device")
    require_device("cpu", "smoke.device")
    plan_only(tmp_path, hidden_recipe(models, ["a"], ["b"]) | {"gate_device": "cuda"})
    out = tmp_path / "results" / "m"
    with pytest.raises(RecipeError, match=r"gate_device: the device 'cuda' is not usable here"):  # the weights record does not even exist
        gates_for_plan(out / "plan.json", tmp_path / "missing" / "weights.json", out / "g.safetensors", out / "g.json")


@pytest.mark.parametrize("config,message", [
    ({"merges": {}}, "merges: lists no merge"),
    ({"merges": None}, "merges: lists no merge"),
    ({"merges": {"m": {"recipe": "a.yaml", "lock": "b"}}}, "merges.m: give exactly one of recipe, lock, published "
                                                           "(given: recipe, lock)"),
    ({"merges": {"m": {}}}, "merges.m: give exactly one of recipe, lock, published (given: none)"),
    ({"merges": {"m": {"recipie": "a.yaml"}}}, "merges.m.recipie: unknown key 'recipie'; did you mean 'recipe'?"),
    ({"merges": {"m": "a.yaml"}}, "merges.m: 'a.yaml' is not of type 'object'"),
])
def test_a_bad_workflow_config_is_one_line_naming_the_key(config, message):
    from moeforge.plan.workflow_config import checked_config

    with pytest.raises(RecipeError) as info:
        checked_config(config)
    assert str(info.value).startswith(f"workflow config (config/config.yaml, then each --configfile, then --config): "
                                      f"{message}"), str(info.value)


@pytest.mark.parametrize(("config", "key"), [
    ({"smoke": {"memory_gb": float("nan")}}, "smoke.memory_gb: nan"),
    ({"smoke": {"memory_gb": float("inf")}}, "smoke.memory_gb: inf"),
])
def test_a_nonfinite_workflow_config_number_names_its_key(config, key):
    """NaN passes JSON Schema's exclusiveMinimum; it is refused by key."""
    from moeforge.plan.workflow_config import checked_config

    with pytest.raises(RecipeError) as info:
        checked_config(config)
    assert f"{key} is not a finite number" in str(info.value), str(info.value)


def test_a_whole_number_in_the_workflow_config_is_an_integer():
    from moeforge.plan.workflow_config import checked_config

    checked = checked_config({"smoke": {"max_new_tokens": 8.0}, "eval": {"context": 64.0}})
    assert checked["smoke"]["max_new_tokens"] == 8 and type(checked["smoke"]["max_new_tokens"]) is int
    assert type(checked["eval"]["context"]) is int


def test_an_empty_merges_list_is_refused_not_the_demo(wd):
    (wd / "mine.yaml").write_text("merges: {}\n")
    proc = subprocess.run([*SNAKEMAKE, "-d", str(wd), "-n", "--cores", "1", "--configfile", str(wd / "mine.yaml")],
                          cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "moeforge: workflow config" in output and "merges: lists no merge" in output, output
    assert "ValidationError" not in output and "demo_models" not in output
