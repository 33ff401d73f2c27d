"""Per-tensor sha256 of merges built from fixed recipes: proof that a change of the code changed no output.

Builds a fixed set of recipes with the real workflow (the demo's tiny models; Mixtral with prompt,
hidden-state and random gates, noise and residual scaling, an untied output, bfloat16; Qwen2-MoE with a
shared expert) and writes, for each merge, every tensor's dtype, shape and sha256 and the model's
config.json and generation_config.json. Run it before and after a change, on the same machine and with
the same demo models (``--models`` reuses a directory of them), and compare the two files::

    python benchmarks/tensor_digests.py --workdir /tmp/before --out before.json
    python benchmarks/tensor_digests.py --workdir /tmp/after --models /tmp/before/resources/demo --out after.json
    python benchmarks/tensor_digests.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
DEMO = "resources/demo"
EXPERTS = ("expert_code", "expert_math", "expert_cooking")
PROMPTS = {"expert_code": ["def f(x):\n    return", "for i in range(3):"],
           "expert_math": ["Tom has 12 apples.", "Solve for x: 3x + 5 = 20."],
           "expert_cooking": ["Preheat the oven.", "Heat the olive oil."]}


def _experts(names, **extra):
    return [{"source_model": f"{DEMO}/{n}", "positive_prompts": PROMPTS[n], **extra.get(n, {})} for n in names]


#: The fixed recipes: each a different path through planning, gates and the shard transforms.
RECIPES = {
    "hidden-bf16": {"base_model": f"{DEMO}/base", "gate_mode": "hidden", "dtype": "bfloat16",
                    "experts": _experts(EXPERTS)},
    "router-input": {"base_model": f"{DEMO}/base", "gate_mode": "router_input", "token_reduction": "mean",
                     "dtype": "float32", "experts": _experts(EXPERTS)},
    "random-scaled": {"base_model": f"{DEMO}/base", "gate_mode": "random", "seed": 7, "dtype": "float32",
                      "tie_word_embeddings": "untie", "experts": _experts(
                          EXPERTS[:2], expert_code={"noise_scale": 0.01}, expert_math={"residual_scale": 0.5})},
    "hidden-qwen": {"base_model": f"{DEMO}/base", "gate_mode": "hidden", "architecture": "qwen",
                   "dtype": "float32", "experts": _experts(EXPERTS[1:]),
                   "shared_experts": _experts(EXPERTS[:1])},
}


def build(workdir: Path, models: Path | None) -> None:
    """Build every recipe with the workflow in ``workdir`` (the demo's models made or copied first)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if models is not None and not (workdir / DEMO).exists():
        shutil.copytree(models, workdir / DEMO)
    recipes = workdir / "recipes"
    recipes.mkdir(exist_ok=True)
    merges = {}
    for name, recipe in RECIPES.items():
        (recipes / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        merges[name] = {"recipe": str(recipes / f"{name}.yaml")}
    (workdir / "digests.yaml").write_text(yaml.safe_dump({"merges": merges}))
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                    "--cores", "2", "--configfile", str(workdir / "digests.yaml")], check=True)


def digests(workdir: Path) -> dict[str, dict]:
    """merge -> {tensors: {name: [dtype, shape, sha256]}, config, generation_config}."""
    out = {}
    for name in RECIPES:
        model = workdir / "results" / name / "model"
        tensors = {}
        for path in sorted(model.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    t = f.get_slice(key)
                    raw = f.get_tensor(key).contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy()
                    tensors[key] = [t.get_dtype(), t.get_shape(), hashlib.sha256(raw.tobytes()).hexdigest()]
        out[name] = {"tensors": tensors,
                     "config": json.loads((model / "config.json").read_text()),
                     "generation_config": json.loads((model / "generation_config.json").read_text())}
    return out


def compare(before: dict, after: dict) -> list[str]:
    """Every difference, one line each; empty when the outputs are the same."""
    lines = []
    for merge in sorted(set(before) | set(after)):
        a, b = before.get(merge), after.get(merge)
        if a is None or b is None:
            lines.append(f"{merge}: only in {'after' if a is None else 'before'}")
            continue
        for key in sorted(set(a["tensors"]) | set(b["tensors"])):
            if a["tensors"].get(key) != b["tensors"].get(key):
                lines.append(f"{merge}: tensor {key}: {a['tensors'].get(key)} -> {b['tensors'].get(key)}")
        for part in ("config", "generation_config"):
            if a[part] != b[part]:
                lines.append(f"{merge}: {part}.json differs")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--models", type=Path, help="a directory of demo models to reuse (resources/demo)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        lines = compare(before, after)
        count = sum(len(m["tensors"]) for m in before.values())
        print("\n".join(lines) or f"identical: {count} tensors and the configs of {len(before)} merges")
        return 1 if lines else 0
    build(args.workdir, args.models)
    args.out.write_text(json.dumps(digests(args.workdir), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
