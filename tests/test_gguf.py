"""Outputs proven in a second engine: llama.cpp's converter, and the GGUF run in llama-cpp-python.

Needs tests/setup_llamacpp.sh (skipped without it, except under CI). Deselect with ``-m "not gguf"``.
"""

from __future__ import annotations

import json
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from moeforge.check.gguf import (
    CONVERTER_ENV,
    KNOWN_DIFFERENCES,
    TOLERANCE,
    UnsupportedByConverter,
    check_ggufs,
    convert,
    converter_dir,
    encode_prompts,
    expected_gguf_bytes,
    gguf_stage,
    known_differences,
    reference_logits,
)
from moeforge.check.gguf_convert import QWEN2_PATTERN, pre_tokenizer_by_definition
from moeforge.demo.tiny_models import build_dense_model, build_preset
from moeforge.errors import BuildError
from moeforge.io import progress as progress_module
from moeforge.runner import run
from pipeline import build

PROMPTS = ["The quick brown fox", "Once upon a time", "def add(a, b): return a + b", "1234 apples\nand pears"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """Llama bases (untied, tied), experts far apart (so swapping two changes the output), Qwen bases."""
    root = tmp_path_factory.mktemp("gguf_models")
    tok = tokenizer_dir
    base = build_dense_model(root / "base", "llama", seed=0, tokenizer_dir=tok)
    tied = build_dense_model(root / "tied", "llama", seed=7, tokenizer_dir=tok, tie_word_embeddings=True)
    out = {"base": base, "tied": tied, "qwen2": build_preset(root / "qwen2", "qwen2.5", tokenizer_dir=tok),
           "qwen3": build_preset(root / "qwen3", "qwen3", tokenizer_dir=tok)}
    for i in range(3):
        out[f"e{i}"] = build_dense_model(root / f"e{i}", derive_from=base, seed=10 + i, mlp_noise=1.0)
        out[f"t{i}"] = build_dense_model(root / f"t{i}", derive_from=tied, seed=20 + i, mlp_noise=1.0)
    return out


def recipe(base: Path, experts: list[Path], **extra) -> dict:
    return {"base_model": str(base), "gate_mode": "random", "experts_per_token": 2,
            "experts": [{"source_model": str(e)} for e in experts], "smoke_prompts": PROMPTS, **extra}


def run_stage(result) -> tuple[dict, Path]:
    """The workflow step on an in-process build; a stand-in smoke report precedes it, as in the workflow."""
    out = result.model_dir.parent
    (out / "smoke").mkdir(exist_ok=True)
    (out / "smoke" / "report.md").write_text("# Smoke test: PASS\n")
    report = gguf_stage(result.model_dir, out / "plan.json", out / "smoke" / "report.md",
                        out / "gguf" / "report.json", out / "gguf" / "report.md", threads=2)
    return report, out / "gguf"


@pytest.mark.gguf
@pytest.mark.parametrize("variant", ["untied", "tied", "untie"])
def test_mixtral_converts_loads_and_matches(tmp_path, zoo, llamacpp_converter, variant):
    """Mixtral outputs, tied and untied: f16 kept, f32 checked, both within tolerance, same next token."""
    base, experts = (zoo["base"], "e") if variant == "untied" else (zoo["tied"], "t")
    extra = {"tie_word_embeddings": "untie"} if variant == "untie" else {}
    result = build(tmp_path, recipe(base, [zoo[f"{experts}{i}"] for i in range(3)], **extra))
    report, out = run_stage(result)
    assert report["passed"] and report["status"] == "pass"
    assert report["converter"] == (llamacpp_converter / "VERSION").read_text().strip()
    for outtype, check in report["checks"].items():
        assert check["max_abs_dlogit"] <= check["tolerance"] == pytest.approx(TOLERANCE[outtype] * check["max_abs_logit"], rel=1e-5)
        assert check["next_token_agree"] == check["prompts"] == len(PROMPTS)
        assert check["tokenization_agree"] == len(PROMPTS), "llama.cpp tokenizes as transformers does"
    assert sorted(p.name for p in out.glob("*.gguf")) == ["model-f16.gguf"]
    assert json.loads((out / "report.json").read_text())["gguf"]["file"] == "model-f16.gguf"
    md = (out / "report.md").read_text()
    assert md.startswith("# GGUF (llama.cpp): PASS") and "# Smoke test: PASS" in md


@pytest.mark.gguf
def test_qwen3_moe_converts_and_matches(tmp_path, zoo, llamacpp_converter):
    q = zoo["qwen3"]
    report, _ = run_stage(build(tmp_path, recipe(q, [q, q])))
    assert report["passed"], report["checks"]


@pytest.mark.gguf
@pytest.mark.parametrize("shared", [True, False])
def test_qwen2_moe_differences_are_caught(tmp_path, zoo, llamacpp_converter, shared):
    """llama.cpp's Qwen2-MoE graph ignores norm_topk_prob (moeforge writes true) and computes the shared
    gate's sigmoid as silu(x)/x (NaN for the all-zero gate of a build without shared experts): the GGUF
    converts, the comparison fails it, and it is kept in failed/ with its report."""
    q = zoo["qwen2"]
    extra = {"shared_experts": [{"source_model": str(q)}]} if shared else {}
    result = build(tmp_path, recipe(q, [q] * 3, **extra))
    assert json.loads((result.model_dir / "config.json").read_text())["norm_topk_prob"] is True
    with pytest.raises(BuildError, match="never renormalises the top-k routing weights"):
        run_stage(result)
    out = result.model_dir.parent / "gguf"
    report = json.loads((out / "failed" / "report.json").read_text())
    f32 = report["checks"]["f32"]
    assert report["status"] == "fail" and not f32["passed"]
    if shared:
        assert f32["non_finite_logits"] == 0 and f32["max_abs_dlogit"] > 10 * f32["tolerance"]
    else:
        assert f32["non_finite_logits"] > 0 and f32["max_abs_dlogit"] is None
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.gguf")] == ["failed/model-f16.gguf"]
    assert not (out / "report.json").exists()


@pytest.mark.gguf
def test_a_gguf_llama_cpp_cannot_load_says_why_and_is_set_aside(tmp_path, tokenizer_dir, llamacpp_converter):
    """llama.cpp's Qwen2-MoE graph needs an explicit output head, which a tied Qwen2-0.5B-style build lacks:
    the message gives llama.cpp's own reason and what to change, and the GGUF leaves the place of a checked one."""
    base = build_preset(tmp_path / "tied", "qwen2-0.5b", tokenizer_dir=tokenizer_dir)
    result = build(tmp_path / "run", recipe(base, [base] * 2))
    with pytest.raises(BuildError, match="output.weight") as info:
        run_stage(result)
    assert "tie_word_embeddings: untie" in info.value.fix
    out = result.model_dir.parent / "gguf"
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.gguf")] == ["failed/model-f16.gguf"]


def swap_w2(model_dir: Path, a: int, b: int) -> None:
    """Swap two experts' down projections in every layer, in place."""
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(path)
        names = [n for n in tensors if f".experts.{a}.w2." in n]
        for name in names:
            other = name.replace(f".experts.{a}.", f".experts.{b}.")
            tensors[name], tensors[other] = tensors[other], tensors[name]
        path.chmod(0o644)
        save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.gguf
def test_corrupted_output_is_caught(tmp_path, zoo, llamacpp_converter):
    """A GGUF converted from a copy whose experts 0 and 1 swapped their w2 fails against the intended model."""
    result = build(tmp_path, recipe(zoo["base"], [zoo[f"e{i}"] for i in range(3)]))
    corrupted = tmp_path / "corrupted"
    shutil.copytree(result.model_dir, corrupted)
    swap_w2(corrupted, 0, 1)
    ids = encode_prompts(result.model_dir, PROMPTS)
    changed = max(float(np.abs(a - b).max()) for a, b in
                  zip(reference_logits(result.model_dir, ids), reference_logits(corrupted, ids)))
    gguf = tmp_path / "corrupted-f32.gguf"
    convert(corrupted, gguf, "f32", llamacpp_converter)
    against_intended = check_ggufs({"f32": gguf}, result.model_dir, PROMPTS)["f32"]
    against_itself = check_ggufs({"f32": gguf}, corrupted, PROMPTS)["f32"]
    assert against_itself["passed"], "the conversion of the damaged copy is faithful to it"
    assert not against_intended["passed"]
    assert against_intended["max_abs_dlogit"] == pytest.approx(changed, rel=1e-3)
    assert against_intended["max_abs_dlogit"] > 100 * against_intended["tolerance"]


@pytest.mark.gguf
def test_architecture_the_converter_lacks_fails_the_step_without_a_gguf(tmp_path, zoo, llamacpp_converter):
    result = build(tmp_path, recipe(zoo["base"], [zoo["e0"], zoo["e1"]]))
    config_path = result.model_dir / "config.json"
    config_path.chmod(0o644)
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "architectures": ["NoSuchMoeForCausalLM"]}))
    with pytest.raises(UnsupportedByConverter, match=r"unsupported by llama.cpp converter llama-cpp-python \S+"):
        convert(result.model_dir, tmp_path / "x.gguf", "f16", llamacpp_converter)
    with pytest.raises(UnsupportedByConverter, match="NoSuchMoeForCausalLM"):
        run_stage(result)
    out = result.model_dir.parent / "gguf"
    assert not list(out.rglob("*.gguf")) and not (out / "report.json").exists()


@pytest.mark.gguf
def test_unknown_pre_tokenizer_is_one_message(tmp_path, zoo, llamacpp_converter):
    """A byte-level BPE whose pre-tokenizer is neither hashed by the converter nor defined like a llama.cpp one."""
    result = build(tmp_path, recipe(zoo["base"], [zoo["e0"], zoo["e1"]]))
    path = result.model_dir / "tokenizer.json"
    path.chmod(0o644)
    path.write_text(path.read_text().replace(r"\\p{N}|", r"\\p{N}{1,3}|"))
    with pytest.raises(BuildError, match="does not know the tokenizer's pre-tokenizer"):
        convert(result.model_dir, tmp_path / "x.gguf", "f16", llamacpp_converter)


def test_config_settings_llama_cpp_leaves_out_are_named():
    """The check's prompts are short, so a GGUF that drops dynamic rope or a sliding window passes; the report
    says where it stops matching."""
    dynamic = known_differences("mixtral", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                            "max_position_embeddings": 256, "sliding_window": None})
    assert "no dynamic NTK rope scaling" in dynamic and "256 tokens" in dynamic
    assert "no sliding window" in known_differences("mixtral", {"sliding_window": 8, "rope_scaling": None})
    assert known_differences("qwen2_moe", {"sliding_window": 8, "use_sliding_window": False}) == \
        KNOWN_DIFFERENCES["qwen2_moe"]
    assert known_differences("mixtral", {"sliding_window": None, "rope_scaling": {"rope_type": "linear"}}) is None


def test_pre_tokenizer_named_by_definition(tokenizer_dir, tmp_path):
    """The test tokenizer is defined as Qwen2's; one step changed, it is no known type."""
    assert pre_tokenizer_by_definition(tokenizer_dir / "tokenizer.json") == "qwen2"
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2_PATTERN.replace(r"\p{N}|", r"\p{N}{1,3}|")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert pre_tokenizer_by_definition(tmp_path / "tokenizer.json") is None


def test_missing_converter_is_one_message(tmp_path, monkeypatch):
    monkeypatch.setenv(CONVERTER_ENV, str(tmp_path))
    with pytest.raises(BuildError, match="setup_llamacpp.sh"):
        converter_dir()


GGUF_STEP = """
import sys, types
from pathlib import Path
from moeforge.check.gguf import gguf_stage
from moeforge.runner import run
out = Path(sys.argv[1])
run(types.SimpleNamespace(log=[str(out / "gguf.log")], rule="gguf_check"),
    lambda s: gguf_stage(out / "model", out / "plan.json", out / "smoke" / "report.md", out / "gguf" / "report.json",
                         out / "gguf" / "report.md", threads=2))
"""


@pytest.mark.gguf
def test_the_converter_and_llama_cpp_talk_to_the_log_and_the_console_gets_a_line_each(tmp_path, zoo,
                                                                                       llamacpp_converter):
    """llama.cpp's hundreds of lines go to the rule's log; the console reads one line per stage, and the
    converter's 'Unknown RoPE type: default' is explained."""
    import subprocess
    import sys

    result = build(tmp_path, recipe(zoo["base"], [zoo["e0"], zoo["e1"]]))
    out = result.model_dir.parent
    (out / "smoke").mkdir(exist_ok=True)
    (out / "smoke" / "report.md").write_text("# Smoke test: PASS\n")
    proc = subprocess.run([sys.executable, "-c", GGUF_STEP, str(out)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "gguf.log").read_text()
    assert "gguf: rope scaling type" in log or "Unknown RoPE type" in log  # the converter's own lines
    assert "llama_model_loader" in log or "llama_" in log  # llama.cpp's loading log
    console = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(console) <= 12, "\n".join(console)
    assert any("converted to GGUF (f16)" in line for line in console)
    if "Unknown RoPE type: default" in log:
        assert any("transformers 5 names unscaled RoPE 'default'" in line for line in console)


@pytest.mark.gguf
def test_conversion_reports_what_it_has_written_in_the_job_log(tmp_path, base_and_experts, llamacpp_converter,
                                                               monkeypatch):
    """The converter says nothing until it ends (minutes at 7B): the job reports the GGUF's size so far against
    the size estimated from the safetensors headers, and at the end the size written."""
    monkeypatch.setattr(progress_module, "EVERY", 0.0)
    result = build(tmp_path, recipe(base_and_experts["base"], [base_and_experts["e0"], base_and_experts["e1"]]))
    gguf, log = tmp_path / "model-f32.gguf", tmp_path / "gguf.log"
    run(types.SimpleNamespace(log=[log]), lambda _: convert(result.model_dir, gguf, "f32", llamacpp_converter))
    lines = [line.split("moeforge: ", 1)[1] for line in log.read_text().splitlines() if "GGUF conversion" in line]
    written = gguf.stat().st_size / (1 << 20)
    assert re.fullmatch(rf"GGUF conversion \(f32\): {written:.1f} MiB written done in \d+ s", lines[-1]), lines
    assert 0.9 * gguf.stat().st_size < expected_gguf_bytes(result.model_dir, "f32") <= gguf.stat().st_size
