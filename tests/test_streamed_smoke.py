"""The smoke test in bounded memory: layer-streamed figures equal the loaded model's, one layer at a time.

Builds go through the real pipeline (Mixtral from Llama, Qwen2-MoE with a shared expert from
Qwen2, Qwen3-MoE from Qwen3; tied and untied embeddings), with experts that differ from the base
so that KL, agreement and routing are not trivial. The reference is the whole model loaded by
transformers in float32.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeforge.check import smoke
from moeforge.check.report import render_markdown
from moeforge.check.smoke import (
    SmokeOptions,
    _base_generation_needed,
    compare_logits,
    routing_stats,
    run_smoke,
    stored_dtype,
)
from moeforge.check.verify import verify_model
from moeforge.demo.tiny_models import build_dense_model
from moeforge.runtime import generation, layerwise
from moeforge.runtime.float32_linear import weight_major_linear
from moeforge.runtime.generation import Generation, over_budget
from moeforge.runtime.layerwise import stream_logits
from moeforge.runtime.memory_budget import GIB, cgroup_memory_limit, memory_budget
from moeforge.runtime.upcast import compute_in_float32
from pipeline import build

PROMPTS = ["The quick brown fox", "def add(a, b):", "Two plus two equals"]
EXPERT_PROMPTS = {"e0": ["Slice the onions thinly"], "e2": ["Solve for x in the equation"]}
EXPERT_NAMES = ["e0", "e1", "e2"]
FAMILIES = {"llama": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
CASES = [(family, tied) for family in FAMILIES for tied in (False, True)]


def _recipe(base: Path, experts: list[Path], shared: bool) -> dict:
    recipe = {"base_model": str(base), "gate_mode": "random", "experts_per_token": 2,
              "experts": [{"source_model": str(e)} for e in experts]}
    if shared:  # Qwen2-MoE's shared expert and its sigmoid gate, which an identity build leaves zero
        recipe["shared_experts"] = [{"source_model": str(experts[0]), "residual_scale": 0.5}]
    return recipe


@pytest.fixture(scope="module")
def builds(tmp_path_factory, tokenizer_dir):
    """(family, tied, identity) -> (merged model dir, base dir), built on first use."""
    made: dict[tuple[str, bool, bool], tuple[Path, Path]] = {}

    def get(family: str, tied: bool, identity: bool = False) -> tuple[Path, Path]:
        key = (family, tied, identity)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{family}-{'tied' if tied else 'untied'}")
            base = build_dense_model(root / "base", family, seed=1, tie_word_embeddings=tied,
                                     tokenizer_dir=tokenizer_dir)
            experts = [base] * 3 if identity else [
                build_dense_model(root / f"e{i}", derive_from=base, seed=20 + i, mlp_noise=0.2) for i in range(3)]
            result = build(root / "build", _recipe(base, experts, shared=family == "qwen2" and not identity))
            assert result.plan.output_family == FAMILIES[family]
            made[key] = (result.model_dir, base)
        return made[key]

    return get


def _options(**changes) -> SmokeOptions:
    fields = {"prompts": PROMPTS, "max_new_tokens": 4, "expert_prompts": EXPERT_PROMPTS,
              "expert_names": EXPERT_NAMES, "memory_gb": 0.5}
    return SmokeOptions(**(fields | changes))


def _ids(texts: list[str], model_dir: Path) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [tokenizer(t, return_tensors="pt").input_ids for t in texts]


@torch.no_grad()
def _whole_model(model_dir: Path, ids: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Logits [T, V] and router logits per text from the model loaded whole, as a user loads it, computed
    with the products the streamed passes use (``weight_major_linear``; test_float32_linear compares those
    with torch's own), so that what differs here is only one layer at a time against the whole model."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    moe = hasattr(model.config, "num_experts_per_tok")
    logits, routers = [], []
    for i in ids:
        with weight_major_linear():
            out = model(input_ids=i, attention_mask=torch.ones_like(i), use_cache=False,
                        **({"output_router_logits": True} if moe else {}))
        logits.append(out.logits[0].float())
        routers.append([r.float() for r in out.router_logits] if moe else [])
    return logits, routers


@pytest.mark.parametrize(("family", "tied"), CASES)
def test_streamed_outputs_equal_the_loaded_model(builds, family, tied):
    model_dir, base = builds(family, tied)
    ids = _ids(PROMPTS, model_dir)
    sparse = {}
    for directory in (model_dir, base):
        streamed = stream_logits(directory, [(i, torch.ones_like(i)) for i in ids], progress=False)
        logits, routers = _whole_model(directory, ids)
        for b in range(len(ids)):
            torch.testing.assert_close(streamed.logits[b][0], logits[b], atol=1e-5, rtol=0)
            for got, want in zip(streamed.router_logits[b], routers[b], strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        sparse[directory] = streamed.sparse_layers
    assert sparse == {model_dir: [0, 1, 2, 3], base: []}


@pytest.mark.parametrize(("family", "tied"), CASES)
def test_smoke_figures_equal_whole_model_figures(builds, family, tied):
    """KL, top-1 agreement, max |Δlogit| and routing statistics, against the loaded models' numbers."""
    model_dir, base = builds(family, tied)
    report = run_smoke(model_dir, base, _options(kl_warn=math.inf))
    texts = PROMPTS + [t for name in EXPERT_NAMES for t in EXPERT_PROMPTS.get(name, [])]
    merged_logits, merged_routers = _whole_model(model_dir, _ids(texts, model_dir))
    base_logits, _ = _whole_model(base, _ids(PROMPTS, model_dir))
    expected = compare_logits(base_logits, merged_logits[: len(PROMPTS)])
    assert expected["max_abs_logit_diff"] > 1e-3  # the experts differ from the base: not a trivial comparison
    _assert_close_numbers(report["comparison"], expected)
    own = {"e0": (0, [3]), "e2": (2, [4])}
    _assert_close_numbers(report["routing"]["layers"], routing_stats(merged_routers, 2, [0, 1, 2, 3], own))


def _assert_close_numbers(got, want, path="") -> None:
    """Equal structure, numbers within 1e-5 (report numbers are rounded to stable digits)."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            _assert_close_numbers(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close_numbers(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5, rel=1e-5), path
    else:
        assert got == want, path


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_builds_pass_the_identity_check(builds, family):
    model_dir, base = builds(family, True, identity=True)
    report = run_smoke(model_dir, base, _options(identity=True))
    assert report["passed"] and report["errors"] == []
    assert report["comparison"]["max_abs_logit_diff"] < 1e-5 and report["comparison"]["top1_agreement"] == 1.0


def test_generating_in_16_bits_keeps_the_comparison_exact(builds, monkeypatch):
    """The comparison runs in float32 whatever dtype generation loads the model in: an identity build passes
    the exact check while both models generate in bfloat16, each loaded whole for that."""
    model_dir, base = builds("llama", True, identity=True)
    streamed, generated = [], []
    original_stream, original_generate = smoke.stream_sequences, smoke.generate_all

    def recording_stream(directory, ids, **kwargs):
        streamed.append(kwargs["dtype"])
        return original_stream(directory, ids, **kwargs)

    def recording_generate(model, *args, **kwargs):
        generated.append({p.dtype for p in model.parameters()})
        return original_generate(model, *args, **kwargs)

    monkeypatch.setattr(smoke, "stream_sequences", recording_stream)
    monkeypatch.setattr(smoke, "generate_all", recording_generate)
    report = run_smoke(model_dir, base, _options(identity=True, dtype="bfloat16", memory_gb=64, max_new_tokens=4))
    assert report["passed"] and report["errors"] == []
    assert report["comparison"]["max_abs_logit_diff"] < 1e-5 and report["comparison"]["top1_agreement"] == 1.0
    # the merged model, then the base (an identity build judges the base's continuations too)
    assert streamed == [torch.float32, torch.float32]
    assert generated == [{torch.bfloat16}, {torch.bfloat16}]


def test_streamed_check_holds_one_layer_at_a_time(builds, monkeypatch):
    """Every read is one module's tensors, and a module is loaded only once every other decoder
    layer, the embedding and the head are back on the meta device (no storage); the prompts are
    embedded from their tokens' rows, never from the whole embedding matrix."""
    model_dir, base = builds("llama", True)
    reads: list[list[str]] = []
    loads: list[str] = []
    rows_read: list[tuple[str, int, int]] = []
    original_read, original_materialise = layerwise.CheckpointTensors.read, layerwise._Runner.materialise
    original_read_rows = layerwise.CheckpointTensors.read_rows

    def recording_read(self, names):
        reads.append(list(names))
        return original_read(self, names)

    def recording_read_rows(self, name, rows):
        got, shape = original_read_rows(self, name, rows)
        rows_read.append((name, got.shape[0], shape[0]))
        return got, shape

    def checked_materialise(self, module):
        name = self.module_names[id(module)]
        alive = {n for n, p in self.model.named_parameters() if not p.is_meta}
        allowed = {"model.norm.weight"} if name == "lm_head" else set()  # the final norm runs just before the head
        assert alive <= allowed, f"loading {name} while {sorted(alive)} are still in memory"
        loads.append(name)
        return original_materialise(self, module)

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(layerwise.CheckpointTensors, "read", recording_read)
    monkeypatch.setattr(layerwise.CheckpointTensors, "read_rows", recording_read_rows)
    monkeypatch.setattr(layerwise._Runner, "materialise", checked_materialise)
    monkeypatch.setattr(layerwise._Runner, "whole_model", no_whole_model)
    report = run_smoke(model_dir, base, _options())
    assert report["passed"] and report["generations"] is None
    layers = [f"model.layers.{i}" for i in range(4)]
    assert loads == [*layers, "model.norm", "lm_head"] * 2  # merged, then base
    assert [name for name, _, _ in rows_read] == ["model.embed_tokens.weight"] * 2
    assert all(0 < count < vocab / 4 for _, count, vocab in rows_read), rows_read
    for names in reads:
        assert len({n.split(".")[2] for n in names if n.startswith("model.layers.")}) <= 1, names
        assert all(n.startswith("model.layers.") for n in names) or not any(
            n.startswith("model.layers.") for n in names), names
    assert ["model.embed_tokens.weight"] in reads[-2:]  # tied: the head is the input embedding, read alone


@pytest.mark.parametrize("tied", [False, True])
def test_a_kept_model_is_whole_and_owns_its_memory(builds, tied):
    """Kept in the checkpoint's own dtype, a tensor read is the memory-mapped file itself; the kept model
    must hold copies, or the file's touched pages stay resident beside them (twice the model's size)."""
    model_dir, _ = builds("llama", tied)
    stored = json.loads((model_dir / "config.json").read_text())["dtype"]
    ids = _ids(PROMPTS[:1], model_dir)
    streamed = stream_logits(model_dir, [(i, torch.ones_like(i)) for i in ids], dtype=getattr(torch, stored),
                             progress=False, keep=True)
    model = streamed.model
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    assert tensors and not [n for n, t in tensors.items() if t.is_meta]
    assert not [n for n, t in tensors.items() if not t.untyped_storage().resizable()]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad(), weight_major_linear():  # the streamed pass's products
        whole = model(input_ids=ids[0]).logits[0]
    torch.testing.assert_close(whole, streamed.logits[0][0].to(whole.dtype), atol=0, rtol=0)


def test_over_budget_skips_generation_and_says_what_to_raise(builds, monkeypatch, caplog):
    model_dir, base = builds("llama", False)
    monkeypatch.setattr(layerwise._Runner, "whole_model",
                        lambda *a, **k: pytest.fail("generation loaded a whole model over the budget"))
    with caplog.at_level(logging.INFO, logger="moeforge"):
        report = run_smoke(model_dir, base, _options(memory_gb=0.5))
    assert report["passed"] and report["generations"] is None and report["comparison"] is not None
    reason = report["memory"]["generation_note"]
    assert report["memory"]["generation"] is None
    assert reason.startswith("greedy generation skipped") and reason in report["warnings"]
    assert "memory budget of 0.50 GiB (smoke.memory_gb in the workflow config)" in reason
    # the least that generates: one layer at a time
    streamed = report["memory"]["streamed_generation_gib"]
    assert report["memory"]["whole_model_gib"] > streamed > 0.5
    assert f"at least {streamed:.2f} GiB: raise smoke.memory_gb in the workflow" in reason
    assert report["memory"]["budget_gib"] == 0.5
    # bfloat16 would not fit either (a tiny model's need is the fixed overhead), so it is not suggested
    assert "smoke.dtype: bfloat16" not in reason
    assert reason in render_markdown(report).split("## Generations (greedy)")[1]
    messages = [r.getMessage() for r in caplog.records]
    first = next(i for i, m in enumerate(messages) if m.startswith("memory budget 0.50 GiB"))
    assert "peak memory so far" in messages[first]
    assert first < next(i for i, m in enumerate(messages) if m.startswith("streamed comparison done"))


@pytest.mark.parametrize(("family", "tied"), [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_within_budget_generates_what_the_loaded_model_generates(builds, monkeypatch, family, tied):
    """Generation runs on the modules the comparison kept: each tensor is read from disk once, and the
    continuations are those of the model as transformers loads it."""
    model_dir, base = builds(family, tied)
    reads: dict[Path, list[str]] = {}
    original_read = layerwise.CheckpointTensors.read

    def counting_read(self, names):
        reads.setdefault(self.base_dir, []).extend(names)
        return original_read(self, names)

    monkeypatch.setattr(layerwise.CheckpointTensors, "read", counting_read)
    report = run_smoke(model_dir, base, _options(memory_gb=64, max_new_tokens=6, kl_warn=math.inf))
    assert report["memory"]["generation"] == "whole" and report["memory"]["generation_note"] is None
    assert [row["prompt"] for row in report["generations"]] == PROMPTS
    assert len(reads[model_dir]) == len(set(reads[model_dir]))  # nothing read twice
    degenerate = any(row["degenerate"] for row in report["generations"])
    # the base generates only when its continuations judge the merged ones (one degenerates)
    assert all(("base_text" in row) == degenerate for row in report["generations"])
    loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    eos = generation.eos_ids(model_dir, loaded.config, tokenizer)
    expected = generation.generate_all(loaded, _ids(PROMPTS, model_dir), tokenizer, eos, 6, name="loaded")
    assert [row["text"] for row in report["generations"]] == [g.text for g in expected]
    assert [row["new_tokens"] for row in report["generations"]] == [len(g.new_tokens) for g in expected]


def test_base_generates_only_to_judge_the_merged_continuations():
    fine = Generation(list(range(10, 26)), "a varied continuation of sixteen tokens")
    looping = Generation([7] * 16, "))))))))))))))))")
    plain, identity = SmokeOptions(prompts=["p"]), SmokeOptions(prompts=["p"], identity=True)
    assert not _base_generation_needed([fine, fine], [2], plain)
    assert _base_generation_needed([fine, looping], [2], plain)
    assert _base_generation_needed([fine], [2], identity)


# --------------------------------------------------------------------------- the budget


def _cgroup_v2(root: Path, limits: dict[str, str]) -> Path:
    for path, value in limits.items():
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / "memory.max").write_text(value + "\n")
    proc = root / "proc_cgroup"
    proc.write_text("0::/user.slice/job\n")
    return proc


def test_cgroup_v2_limit_is_the_tightest_along_the_path(tmp_path):
    proc = _cgroup_v2(tmp_path, {"user.slice/job": "max", "user.slice": str(8 * GIB), ".": str(64 * GIB)})
    assert cgroup_memory_limit(proc, tmp_path) == (8 * GIB, tmp_path / "user.slice" / "memory.max")
    budget = memory_budget(None, 4000, proc_cgroup=proc, cgroup_root=tmp_path)
    assert budget.limit == 8 * GIB and "cgroup" in budget.source  # the cgroup wins over mem_mb
    assert memory_budget(3, 4000, proc_cgroup=proc, cgroup_root=tmp_path).limit == 3 * GIB  # the config wins


def test_cgroup_v1_limit_and_unlimited_values(tmp_path):
    job = tmp_path / "memory" / "slurm" / "job_7"
    job.mkdir(parents=True)
    (job / "memory.limit_in_bytes").write_text(f"{6 * GIB}\n")
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:cpu,cpuacct:/slurm/job_7\n4:memory:/slurm/job_7\n0::/\n")
    assert cgroup_memory_limit(proc, tmp_path) == (6 * GIB, job / "memory.limit_in_bytes")
    (job / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit(proc, tmp_path) is None


def test_without_a_cgroup_limit_the_job_request_is_the_budget(tmp_path):
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       33554432 kB\nMemFree:         1000000 kB\nMemAvailable:   20971520 kB\n")
    budget = memory_budget(None, 5000, proc_cgroup=proc, cgroup_root=tmp_path, meminfo=meminfo)
    assert budget.limit == 5000 << 20 and "mem_mb" in budget.source and "smoke_test:mem_mb" in budget.raise_how
    assert budget.allows(5000 << 20) and not budget.allows((5000 << 20) + 1)
    # a request no cgroup enforces, larger than what the machine has free (a 48 GB model on a 32 GB
    # workstation): the available memory, never the total, bounds what is loaded
    bigger = memory_budget(None, 74_000, proc_cgroup=proc, cgroup_root=tmp_path, meminfo=meminfo)
    assert bigger.limit == 74_000 << 20 and bigger.available == 20 * GIB
    assert bigger.allows(20 * GIB) and not bigger.allows(20 * GIB + 1)
    over, how = over_budget(bigger, 30 * GIB)
    assert "20.00 GiB this machine has available (MemAvailable" in over and "smoke.memory_gb" in how
    unrequested = memory_budget(None, None, proc_cgroup=proc, cgroup_root=tmp_path, meminfo=meminfo)
    assert unrequested.limit is None and not unrequested.allows(21 * GIB)
    nothing = memory_budget(None, None, proc_cgroup=tmp_path / "absent", cgroup_root=tmp_path,
                            meminfo=tmp_path / "absent")
    assert nothing.limit is None and nothing.allows(1 << 50)
    limited = memory_budget(None, 5000, proc_cgroup=_cgroup_v2(tmp_path / "v2", {"user.slice/job": str(GIB)}),
                            cgroup_root=tmp_path / "v2", meminfo=meminfo)
    assert limited.available is None  # a cgroup limit is enforced: the machine's free memory is not asked


def test_verify_takes_the_smoke_tests_dtype_policy_from_the_models_headers(tmp_path, tokenizer_dir):
    """A downloaded merge has no plan: `verify` reads dtype and size from the headers, honours smoke.dtype,
    and for auto holds a small bfloat16 model in float32 on a CPU, whatever 16-bit instructions it has."""
    base = build_dense_model(tmp_path / "base", "llama", seed=1, tokenizer_dir=tokenizer_dir)
    expert = build_dense_model(tmp_path / "e1", derive_from=base, seed=21, mlp_noise=0.2)
    recipe = _recipe(base, [base, expert], shared=False) | {"dtype": "bfloat16"}
    model_dir = build(tmp_path / "build", recipe).model_dir
    assert stored_dtype(model_dir) == "BF16"
    generated: list[set[torch.dtype]] = []
    original = smoke.generate_all

    def recording(model, *args, **kwargs):
        generated.append({p.dtype for p in model.parameters()})
        return original(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(smoke, "generate_all", recording)
        sources = tmp_path / "build" / "resources"
        asked = verify_model(model_dir, tmp_path / "asked", device="cpu", max_new_tokens=2, dtype="float16",
                             memory_gb=8, models_root=sources)
        auto = verify_model(model_dir, tmp_path / "auto", device="cpu", max_new_tokens=2, memory_gb=8,
                            models_root=sources)
    assert asked["passed"] and asked["options"]["dtype"] == "float16"
    assert auto["passed"] and auto["options"]["dtype"] == "float32"
    assert generated == [{torch.float16}, {torch.float32}]


# --------------------------------------------------------------------------- generation one layer at a time


@pytest.mark.parametrize(("family", "tied", "resident"),
                         [("llama", True, 0), ("qwen2", False, 0), ("qwen3", True, 0), ("qwen2", False, 2)])
def test_generation_one_layer_at_a_time_continues_as_the_whole_model(builds, family, tied, resident):
    """The same greedy tokens as the loaded model, while no decoder layer but the resident ones and the one
    running ever holds weights."""
    model_dir, _ = builds(family, tied)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids, eos = _ids(PROMPTS, model_dir), [tokenizer.eos_token_id]
    model = layerwise.streamed_model(model_dir, "cpu", torch.float32, resident_layers=resident)
    layers = list(model.model.layers)
    loaded_in_call: list[tuple[int, ...]] = []

    def loaded() -> tuple[int, ...]:
        return tuple(i for i, layer in enumerate(layers) if not next(layer.parameters()).is_meta)

    for index, layer in enumerate(layers):  # registered after the loading hooks: runs once the layer has its weights
        layer.register_forward_pre_hook(lambda _module, _args, index=index: loaded_in_call.append(
            tuple(sorted({*range(resident), index})) == loaded()))
    streamed = generation.generate_all(model, ids, tokenizer, eos, 6, name="streamed")
    assert len(loaded_in_call) > len(layers) and all(loaded_in_call)
    assert loaded() == tuple(range(resident))  # the streamed ones all freed after the last token
    loaded_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    expected = generation.generate_all(loaded_model, ids, tokenizer, eos, 6, name="loaded")
    assert [g.new_tokens for g in streamed] == [g.new_tokens for g in expected]


@pytest.mark.parametrize(("family", "resident"), [("llama", 1), ("qwen2", 0)])
def test_a_model_held_in_bfloat16_computes_in_float32_one_layer_upcast_at_a_time(builds, family, resident):
    """Streamed or resident, each decoder layer computes with float32 weights during its call and holds its
    bfloat16 ones (or, streamed, none) between calls; the continuations are those of the model loaded in
    bfloat16 and computed in float32."""
    model_dir, _ = builds(family, False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids, eos = _ids(PROMPTS, model_dir), [tokenizer.eos_token_id]
    model = compute_in_float32(layerwise.streamed_model(model_dir, "cpu", torch.bfloat16, resident_layers=resident))
    layers = list(model.model.layers)
    in_call: set[torch.dtype] = set()
    for layer in layers:  # registered after the upcasting hooks
        layer.register_forward_pre_hook(lambda module, _args: in_call.update(p.dtype for p in module.parameters()))
    streamed = generation.generate_all(model, ids, tokenizer, eos, 6, name="streamed")
    assert in_call == {torch.float32}
    held = [{p.dtype if not p.is_meta else "meta" for p in layer.parameters()} for layer in layers]
    assert held == [{torch.bfloat16}] * resident + [{"meta"}] * (len(layers) - resident)
    assert {p.dtype for p in model.model.embed_tokens.parameters()} == {torch.bfloat16}
    rounded = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).float().eval()
    expected = generation.generate_all(rounded, ids, tokenizer, eos, 6, name="loaded")
    assert [g.new_tokens for g in streamed] == [g.new_tokens for g in expected]


@pytest.mark.parametrize("room_layers", [0.5, 1.5])
def test_a_budget_under_the_whole_model_generates_one_layer_at_a_time(builds, monkeypatch, room_layers):
    """Between what one layer at a time needs and what the whole model needs: generation runs streamed, keeping
    loaded the layers the rest of the budget holds; the report says so and why, and the continuations are
    those of the whole model."""
    model_dir, base = builds("llama", False)
    sizes = generation.LayerSizes.of(model_dir, "float32")
    budget_gib = (sizes.streamed() + room_layers * max(sizes.layers)) / GIB
    whole = run_smoke(model_dir, base, _options(memory_gb=64, max_new_tokens=6, kl_warn=math.inf))
    monkeypatch.setattr(layerwise._Runner, "whole_model",
                        lambda *a, **k: pytest.fail("generation loaded a whole model over the budget"))
    report = run_smoke(model_dir, base, _options(memory_gb=budget_gib, max_new_tokens=6, kl_warn=math.inf))
    memory = report["memory"]
    assert memory["streamed_generation_gib"] <= budget_gib < memory["whole_model_gib"]
    kept = int(room_layers)
    assert memory["generation"] == "streamed" and memory["resident_layers"] == kept
    ran = (f"kept the first {kept} of {len(sizes.layers)} decoder layers loaded and ran the others" if kept
           else "ran one decoder layer at a time")
    assert memory["generation_note"].startswith(f"greedy generation {ran}")
    assert f"memory budget of {budget_gib:.2f} GiB" in memory["generation_note"]
    assert report["generations"] == whole["generations"] and report["comparison"] == whole["comparison"]
    markdown = render_markdown(report)
    assert ran in markdown.split("## Generations (greedy)")[1]


def test_resident_layers_are_those_the_room_holds_and_leave_one_to_stream():
    """Layers are kept from the first while their running total fits the room; the last always streams."""
    sizes = generation.LayerSizes(outside=100, layers=[10, 10, 20, 10])
    assert [sizes.resident(room) for room in (0, 9, 10, 39, 40, 10**9)] == [0, 0, 1, 2, 3, 3]
    assert sizes.streamed() == generation.STREAMED_OVERHEAD + 100 + 3 * 20


@pytest.mark.parametrize("tied", [False, True])
def test_a_16bit_model_computed_upcast_needs_the_float32_copy_of_its_largest_module(builds, tied):
    """Streamed generation of a bfloat16-held model on a CPU holds, beside one layer, the float32 copy of the
    largest module while it runs: a decoder layer, or the embedding or head."""
    model_dir, _ = builds("llama", tied)
    entries = layerwise.CheckpointTensors(model_dir).entries()
    outside = max(e.nbytes for n, e in entries.items() if ".layers." not in n) // 2  # float32 on disk, in bfloat16
    held = generation.LayerSizes.of(model_dir, "bfloat16")
    upcast = generation.LayerSizes.of(model_dir, "bfloat16", upcast=True)
    largest = max(*held.layers, outside)
    assert held.upcast == 0 and upcast.upcast == 2 * largest
    assert upcast.streamed() == held.streamed() + 2 * largest
    assert generation.LayerSizes.of(model_dir, "float32", upcast=True).upcast == 0  # float32 is not upcast
