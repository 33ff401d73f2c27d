"""How plan.json splits a merge into shard jobs, and what those jobs ask the scheduler for.

Frames are built at the sizes users merge (SmolLM2-135M, 1B-class and 7B-class shapes), since the
grouping exists for exactly those sizes: small layers share a job, large ones keep their own.
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from moeforge.memory_need import whole_model_mb
from moeforge.plan.plan_json import Plan
from moeforge.plan.recipe import ExpertSpec, Recipe, RouterTraining
from moeforge.plan.rows import SHARD_TARGET_BYTES, _layer_groups, group_shards, layer_bytes
from moeforge.plan.table import GATES_SOURCE, ROUTERS_SHARD
from moeforge.resources import (
    GATE_THREADS,
    gates_threads,
    shard_mem_mb,
    smoke_dtype,
    smoke_mem_mb,
    smoke_threads,
    train_threads,
)
from moeforge.runtime.devices import computes_16bit

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "kv": 192, "num_hidden_layers": 30, "vocab": 49152}
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "kv": 512, "num_hidden_layers": 16, "vocab": 128256}
MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "kv": 1024, "num_hidden_layers": 32, "vocab": 32000}


def _row(shard: str, source: str, shape: tuple[int, ...]) -> dict[str, str]:
    return {"shard": shard, "source": source, "dtype_out": "BF16", "shape": ",".join(map(str, shape))}


def plan_frame(shape: dict[str, int], experts: int) -> pd.DataFrame:
    """The rows of a Mixtral plan with this base shape: embedding, and per layer attention, router, experts."""
    h, i, kv = shape["hidden_size"], shape["intermediate_size"], shape["kv"]
    rows = [_row("globals", "base", (shape["vocab"], h)), _row("globals", "base", (h,))]
    for layer in range(shape["num_hidden_layers"]):
        shard = f"layer-{layer}"
        rows += [_row(shard, "base", s) for s in [(h, h), (kv, h), (kv, h), (h, h), (h,), (h,)]]
        rows.append(_row(shard, GATES_SOURCE, (experts, h)))
        rows += [_row(shard, f"expert{e}", s) for e in range(experts) for s in [(i, h), (i, h), (h, i)]]
    return pd.DataFrame(rows)


def test_groups_are_consecutive_near_equal_and_cover_every_layer():
    for layers in (1, 4, 16, 30, 61):
        for total in (1, SHARD_TARGET_BYTES, 3 * SHARD_TARGET_BYTES + 1, 10**12):
            groups = _layer_groups(layers, total)
            assert [i for g in groups for i in g] == list(range(layers))
            assert max(map(len, groups)) - min(map(len, groups)) <= 1
            assert len(groups) == min(layers, -(-total // SHARD_TARGET_BYTES))


def test_small_layers_share_a_shard_and_routers_have_their_own():
    assert group_shards(plan_frame(SMOLLM2, experts=3), 30)[1] == ["globals", "layers-0-29", ROUTERS_SHARD]
    frame = plan_frame(SMOLLM2, experts=8)
    per_layer = layer_bytes(frame)
    assert len(per_layer) == 30 and SHARD_TARGET_BYTES < sum(per_layer.values()) < 2 * SHARD_TARGET_BYTES
    grouped, shards = group_shards(frame, 30)
    assert shards == ["globals", "layers-0-14", "layers-15-29", ROUTERS_SHARD]
    assert set(grouped["shard"]) == set(shards)
    assert (grouped["shard"] == ROUTERS_SHARD).equals(grouped["source"] == GATES_SOURCE)
    # layer 14's attention and experts stay in the first run, layer 15's in the second
    assert grouped.loc[frame["shard"] == "layer-14", "shard"].isin(["layers-0-14", ROUTERS_SHARD]).all()
    assert grouped.loc[frame["shard"] == "layer-15", "shard"].isin(["layers-15-29", ROUTERS_SHARD]).all()
    assert (grouped.loc[frame["shard"] == "globals", "shard"] == "globals").all()


def test_large_layers_keep_one_job_each():
    frame = plan_frame(MISTRAL_7B, experts=4)
    assert min(layer_bytes(frame).values()) > SHARD_TARGET_BYTES
    _, shards = group_shards(frame, 32)
    assert shards == ["globals", *(f"layers-{i}-{i}" for i in range(32)), ROUTERS_SHARD]


def test_mid_sized_layers_share_a_job_by_twos_and_threes():
    """A 1B-class 4-expert merge (0.42 GB a layer, 6.8 GB in all): 7 runs of 2-3 layers, not 16 jobs."""
    _, shards = group_shards(plan_frame(LLAMA_1B, experts=4), 16)
    runs = [tuple(map(int, name.removeprefix("layers-").split("-"))) for name in shards[1:-1]]
    assert shards[0] == "globals" and shards[-1] == ROUTERS_SHARD and len(runs) == 7
    assert [first for first, _ in runs] == [0, *(last + 1 for _, last in runs[:-1])] and runs[-1][1] == 15
    assert {last - first + 1 for first, last in runs} == {2, 3}


def typed_plan(recipe: Recipe, base_params: dict, layer_bytes: int, shard_bytes: dict[str, int]) -> Plan:
    """A bf16 Mixtral plan of this recipe and these sizes, the fields resource requests do not read left plain."""
    return Plan(merge="m", recipe=recipe, base="base", input_family="llama", output_family="mixtral",
                num_layers=base_params.get("num_hidden_layers", 1), num_experts=len(recipe.experts),
                hidden_size=base_params.get("hidden_size", 1), shared_intermediate_size=None, dtype_out="BF16",
                tie_output=False, experts=(), shared_experts=(), sources={}, base_params=base_params,
                window_layers=(), shards=tuple(shard_bytes), shard_keys={}, shard_bytes=shard_bytes, layer_bytes=layer_bytes,
                decisions=(), warnings=())


def _plan(shape: dict[str, int], mode: str, prompts: list[str]) -> Plan:
    frame = plan_frame(shape, experts=3)
    experts = tuple(ExpertSpec(f"org/e{i}", f"e{i}", positive_prompts=tuple(prompts)) for i in range(3))
    return typed_plan(Recipe(base_model="base", experts=experts, gate_mode=mode),
                      {k: v for k, v in shape.items() if k != "kv"}, max(layer_bytes(frame).values()),
                      {"globals": 2 * shape["vocab"] * shape["hidden_size"]})


@pytest.mark.parametrize("mode", ["random", "uniform_random", "cheap_embed"])
def test_gates_without_a_forward_pass_take_one_thread(mode):
    assert gates_threads(_plan(LLAMA_1B, mode, ["a long prompt " * 500] * 20)) == 1


def test_gate_threads_follow_the_forward_pass_work():
    three_prompts = ["Write a short story about a dragon.", "Solve 12 * 7.", "Explain photosynthesis."]
    assert gates_threads(_plan(SMOLLM2, "hidden", three_prompts)) == 1
    assert gates_threads(_plan(LLAMA_1B, "hidden", ["a long prompt " * 500] * 20)) == GATE_THREADS
    assert gates_threads(None) == GATE_THREADS


def test_training_threads_follow_the_training_passes_not_the_gates():
    """A 1B-class layerwise training with few short prompts: the gates take one thread, the training (every
    training token through every layer, two experts each) the full count; a small model's training one."""
    three_prompts = ["Write a short story about a dragon.", "Solve 12 * 7.", "Explain photosynthesis."]
    big = _plan(LLAMA_1B, "hidden", three_prompts)
    trained = replace(big, recipe=replace(big.recipe, router_training=RouterTraining(tokens_per_expert=2048)))
    assert gates_threads(trained) == 1 and train_threads(trained) == GATE_THREADS
    tiny = {**SMOLLM2, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}
    small = _plan(tiny, "hidden", three_prompts)
    assert train_threads(replace(small, recipe=replace(small.recipe, router_training=RouterTraining()))) == 1


def test_smoke_threads_follow_the_smoke_passes():
    """A 1B-class smoke test (two models over the prompts, 16 new tokens each) takes the full count; a small
    model's, whose job is mostly its imports, one thread, beside other jobs; more tokens, new or prompted, more."""
    three_prompts = ["Write a short story about a dragon.", "Solve 12 * 7.", "Explain photosynthesis."]
    assert smoke_threads(_plan(LLAMA_1B, "hidden", three_prompts), max_new_tokens=16) == GATE_THREADS
    tiny = {**SMOLLM2, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}
    assert smoke_threads(_plan(tiny, "hidden", three_prompts), max_new_tokens=16) == 1
    smollm = _plan(SMOLLM2, "hidden", ["Write a short story about a dragon."])
    assert smoke_threads(smollm, max_new_tokens=16) == 1 and smoke_threads(smollm, max_new_tokens=4096) == GATE_THREADS
    assert smoke_threads(_plan(SMOLLM2, "hidden", three_prompts), max_new_tokens=16) == GATE_THREADS
    assert smoke_threads(None, max_new_tokens=16) == GATE_THREADS


def test_shard_memory_follows_one_layer_not_the_run_of_layers():
    plan = _plan(SMOLLM2, "hidden", [])
    one_layer = shard_mem_mb(plan, "layers-0-14")
    assert one_layer == shard_mem_mb(plan, "layers-29-29")
    assert 500 < one_layer and shard_mem_mb(plan, "globals") > 500


def _smoke_plan(expert_sources: list[str], gib_out: float) -> Plan:
    """A bf16 plan whose experts come from these sources (``base``: the base model), unmodified."""
    experts = tuple(ExpertSpec(s, f"e{i}") for i, s in enumerate(expert_sources))
    return typed_plan(Recipe(base_model="base", experts=experts), {"rope": {"scaling": None}, "sliding_window": None},
                      0, {"globals": int(gib_out * 2**30)})


def test_the_smoke_test_holds_the_model_in_its_dtype_on_accelerators_and_in_float32_on_cpus_while_small():
    merge, identity = _smoke_plan(["base", "code", "math"], 0.5), _smoke_plan(["base", "base"], 0.5)
    large = _smoke_plan(["base", "code"], 5)  # 10 GiB in float32
    assert smoke_dtype(merge, "auto", computes_16bit=True) == smoke_dtype(identity, "auto", computes_16bit=True) == "bfloat16"
    assert smoke_dtype(merge, "auto", computes_16bit=False) == "float32"
    assert smoke_dtype(large, "auto", computes_16bit=False) == "bfloat16"
    assert smoke_dtype(merge, "float32", computes_16bit=True) == "float32"
    assert smoke_dtype(merge, "bfloat16", computes_16bit=False) == "bfloat16"
    # the memory request covers the whole model in the dtype the job may choose on any device: float32 while
    # small (twice the bytes), the model's own dtype above the limit
    assert smoke_mem_mb(merge, "auto") == smoke_mem_mb(identity, "auto") == whole_model_mb(2**30)
    assert smoke_mem_mb(merge, "bfloat16") == whole_model_mb(2**29)
    assert smoke_mem_mb(large, "auto") == whole_model_mb(5 * 2**30)


def test_cpus_compute_in_float32_and_accelerators_in_16_bits():
    """Whatever 16-bit instructions a CPU has: its forward passes do not depend on them."""
    assert not computes_16bit("cpu") and computes_16bit("cuda") and computes_16bit("cuda:1") and computes_16bit("mps")
