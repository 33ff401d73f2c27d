"""The smoke test, gates and evaluation give the same numbers on CPUs with and without native bfloat16.

torch computes bfloat16 products with oneDNN's AVX512-BF16/AMX kernels where the CPU has them and with
its own elsewhere, and the two round differently. ``ONEDNN_MAX_CPU_ISA=AVX2`` in a fresh process makes
a CPU that has them compute bfloat16 as one without them does (the same numbers as torch's own kernels,
measured, and about ten times slower): the switch that runs both paths on one machine. Each run below
happens in a fresh process, once as the machine is and once switched, on a bfloat16 merge of bfloat16
models, and everything the stages report must be identical. A CPU without the instructions has only
the one path; the switch then changes nothing, and the runs check that path against itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeforge.demo.tiny_models import build_dense_model
from moeforge.runtime.generation import eos_ids, generate_all
from pipeline import build

#: The switch: bfloat16 computed as on a CPU without AVX512-BF16 or AMX.
WITHOUT_NATIVE_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
PROMPTS = ["The quick brown fox", "def add(a, b):", "Two plus two equals"]
NEW_TOKENS = 6

#: Run in a fresh process: the smoke test (the model held in bfloat16; the logits of the model it generates
#: with recorded too, as greedy tokens hide small differences), hidden gates and the evaluation, and, as the
#: control, the merged model computed in bfloat16 by transformers. Prints one JSON object.
_STAGES = r"""
import hashlib, json, math, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from moeforge.check import smoke
from moeforge.check.evaluate import EvalOptions, evaluate
from moeforge.gates.compute import compute_gates
from moeforge.plan.recipe import ExpertSpec, Recipe
from moeforge.io.domains import heldout_paths

args = json.loads(sys.argv[1])
model, base, experts = Path(args["model"]), Path(args["base"]), [Path(e) for e in args["experts"]]
digest = lambda tensors: hashlib.sha256(b"".join(t.float().numpy().tobytes() for t in tensors)).hexdigest()
generated, generating_logits = [], []
generate_all = smoke.generate_all


def recording(model, prompt_ids, *rest, **kwargs):
    with torch.no_grad():
        generating_logits.append(digest([model(input_ids=ids).logits for ids in prompt_ids]))
    generated.append(generate_all(model, prompt_ids, *rest, **kwargs))
    return generated[-1]


smoke.generate_all = recording
report = smoke.run_smoke(model, base, smoke.SmokeOptions(
    prompts=args["prompts"], max_new_tokens=args["new_tokens"], dtype="bfloat16", memory_gb=8, kl_warn=math.inf,
    expert_names=["e0", "e1"], expert_prompts={"e0": ["Slice the onions thinly"], "e1": ["Solve for x"]}))
recipe = Recipe(base_model="org/base", gate_mode="hidden", experts=(
    ExpertSpec("org/e0", "e0", ("def mean(values):", "a list keeps items")),
    ExpertSpec("org/e1", "e1", ("the oven is hot", "bread"), ("import os",))))
gates, _ = compute_gates(base, recipe, progress=False)
domains = heldout_paths()
ppl = evaluate(model, base, {"e0": experts[0], "e1": experts[1]}, domains, EvalOptions(context=64, max_tokens=256))
tokenizer = AutoTokenizer.from_pretrained(str(model))
bf16 = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.bfloat16).eval()
with torch.no_grad():
    control = [bf16(**tokenizer(p, return_tensors="pt")).logits for p in args["prompts"]]
print(json.dumps({
    "smoke": {k: report[k] for k in ("comparison", "routing", "generations", "passed", "memory")},
    "new_tokens": [[g.new_tokens for g in run] for run in generated],
    "generating_logits": generating_logits,
    "gates": {name: digest([t]) for name, t in sorted(gates.items())},
    "eval": ppl["perplexity"],
    "bfloat16_logits": digest(control),
}))
"""


@pytest.fixture(scope="module")
def bf16_merge(tmp_path_factory, tokenizer_dir) -> dict[str, Path | list[Path]]:
    """A bfloat16 Mixtral from bfloat16 Llama models whose experts differ from the base; wide enough that
    bfloat16 products take the vectorised kernels (hidden 256)."""
    root = tmp_path_factory.mktemp("bf16")
    base = build_dense_model(root / "base", "llama", seed=3, hidden_size=256, intermediate_size=512,
                             dtype="bfloat16", tokenizer_dir=tokenizer_dir)
    experts = [build_dense_model(root / f"e{i}", derive_from=base, seed=40 + i, mlp_noise=0.2) for i in range(2)]
    recipe = {"base_model": str(base), "gate_mode": "random", "dtype": "bfloat16", "experts_per_token": 1,
              "experts": [{"source_model": str(e)} for e in experts]}
    return {"model": build(root / "build", recipe).model_dir, "base": base, "experts": experts}


def _stages(merge: dict, switch: dict[str, str]) -> dict:
    """The stages' results in a fresh process with ``switch`` added to its environment."""
    args = {"model": str(merge["model"]), "base": str(merge["base"]), "experts": [str(e) for e in merge["experts"]],
            "prompts": PROMPTS, "new_tokens": NEW_TOKENS}
    proc = subprocess.run([sys.executable, "-c", _STAGES, json.dumps(args)], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)} | switch, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def both_paths(bf16_merge) -> tuple[dict, dict]:
    return _stages(bf16_merge, {}), _stages(bf16_merge, WITHOUT_NATIVE_BF16)


def test_the_switch_changes_bfloat16_products_where_the_cpu_has_native_ones(both_paths):
    """The control: transformers computing the merged model in bfloat16 gives other logits when switched, on a
    CPU with the instructions. So the runs below would see a stage that computes in bfloat16."""
    native, switched = both_paths
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        pytest.skip("this CPU has no native bfloat16: there is one path only, which the other tests run")
    assert native["bfloat16_logits"] != switched["bfloat16_logits"]


def test_the_smoke_test_gates_and_eval_are_the_same_with_and_without_native_bfloat16(both_paths):
    native, switched = both_paths
    assert native["smoke"]["passed"] and native["smoke"]["memory"]["generation"] == "whole"
    assert native["smoke"]["comparison"]["max_abs_logit_diff"] > 1e-3  # the experts differ from the base
    for stage in ("smoke", "new_tokens", "generating_logits", "gates", "eval"):
        assert native[stage] == switched[stage], stage


def test_a_model_held_in_bfloat16_continues_as_transformers_does_in_float32(both_paths, bf16_merge):
    """On a CPU the smoke test computes in float32 whatever the model is held in (bfloat16 here): the
    continuations are those of ``generate`` on the model loaded in float32."""
    model_dir = bf16_merge["model"]
    loaded = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    expected = generate_all(loaded, ids, tokenizer, eos_ids(model_dir, loaded.config, tokenizer), NEW_TOKENS, "loaded")
    assert both_paths[0]["new_tokens"][0] == [g.new_tokens for g in expected]
