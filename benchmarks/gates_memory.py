"""Peak memory of gate computation: layer-streamed ``compute_gates`` vs a whole-model forward.

Builds a seeded random Llama-style checkpoint (16 layers, a few hundred MB in bf16 by default),
then measures, each in a fresh child process, the peak resident set size (``ru_maxrss`` of that
child, from ``os.wait4``) of:

* ``imports``: start-up, imports of the model code and the tokenizer (the floor every run pays);
* ``compute_gates``: ``compute_gates(mode="hidden")`` on the checkpoint;
* ``full_bf16`` / ``full_fp32``: ``AutoModelForCausalLM.from_pretrained`` + one forward with
  ``output_hidden_states`` on the same prompts, the way mergekit-moe computes ``hidden`` gates
  (it loads in bf16), and in float32, the precision ``compute_gates`` computes in.

Usage: ``python benchmarks/gates_memory.py [--workdir DIR] [--layers 16] [--hidden 1024]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = {
    "code": ["def add(a, b): return a + b", "import numpy as np", "class Parser: pass"],
    "math": ["the integral of x squared", "a prime number has two divisors", "solve 2x + 3 = 7"],
    "cooking": ["whisk the eggs with sugar", "bake the bread in a hot oven", "chop the onions"],
}

CHILDREN = {
    "imports": """
import torch, transformers.models.llama.modeling_llama, moeforge.gates
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(BASE)
""",
    "compute_gates": """
from moeforge.gates.compute import compute_gates
from moeforge.plan.recipe import parse_recipe
recipe = parse_recipe({"base_model": BASE, "gate_mode": "hidden", "experts": [
    {"source_model": BASE, "name": name, "positive_prompts": prompts} for name, prompts in PROMPTS.items()]})
tensors, stats = compute_gates(BASE, recipe, progress=False)
assert len(tensors) == stats["num_layers"]
""",
    "full_bf16": """
FULL_FORWARD
model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16)
forward(model)
""",
    "full_fp32": """
FULL_FORWARD
model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
forward(model)
""",
}

FULL_FORWARD = """
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(BASE)
tokenizer.padding_side = "left"
texts = [tokenizer.bos_token + p for prompts in PROMPTS.values() for p in prompts]
batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
def forward(model):
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1
"""


def build_checkpoint(out_dir: Path, layers: int, hidden: int) -> Path:
    """A seeded random bf16 Llama-style checkpoint, built once and reused on later runs.

    It is built in a child process: a child's ``ru_maxrss`` includes the RSS its parent had when
    it forked, so this process must stay small (it never imports torch).
    """
    if not (out_dir / "config.json").is_file():
        arguments = dict(
            family="llama", seed=0, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_layers=layers,
            num_heads=hidden // 64, num_kv_heads=hidden // 64, dtype="bfloat16", max_shard_size="200MB",
        )
        code = f"from moeforge.demo.tiny_models import build_dense_model\nbuild_dense_model({str(out_dir)!r}, **{arguments!r})"
        subprocess.run([sys.executable, "-c", code], check=True, stdin=subprocess.DEVNULL)
    return out_dir


def peak_rss_mib(code: str, base: Path) -> tuple[float, float]:
    """Run ``code`` in a fresh interpreter; return (its peak RSS in MiB, wall seconds)."""
    source = f"BASE = {str(base)!r}\nPROMPTS = {PROMPTS!r}\n" + code.replace("FULL_FORWARD", FULL_FORWARD)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"benchmark child failed with exit code {process.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def disk_mib(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the checkpoint is built (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gates-memory-"))
    base = build_checkpoint(workdir / f"llama-{args.layers}x{args.hidden}", args.layers, args.hidden)
    size = disk_mib(base)
    results = {"checkpoint": str(base), "layers": args.layers, "hidden_size": args.hidden, "disk_mib": round(size, 1)}
    print(f"checkpoint: {args.layers} layers, hidden {args.hidden}, {size:.1f} MiB of bf16 safetensors")
    print(f"{'run':<15}{'peak RSS MiB':>14}{'minus imports':>15}{'x disk':>8}{'wall s':>8}")
    floor = None
    for name, code in CHILDREN.items():
        rss, wall = peak_rss_mib(code, base)
        floor = rss if floor is None else floor
        results[name] = {"peak_rss_mib": round(rss, 1), "wall_s": round(wall, 2)}
        print(f"{name:<15}{rss:>14.1f}{rss - floor:>15.1f}{(rss - floor) / size:>8.2f}{wall:>8.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
