# Config and recipe loading, the merge table, input functions, wildcard constraints.
import json
import re

from moeforge.errors import MoeforgeError
from moeforge.recipe import check_merge_name, load_recipe
from moeforge.safetensors_io import ITEMSIZE
from moeforge.sources import parse_ref
from moeforge.stages import smoke_dtype


def _load_recipes():
    """Validate every merge's recipe at parse time: bad recipes fail before any job runs."""
    try:
        for merge in config["merges"]:
            check_merge_name(merge)
        return {m: load_recipe(spec["recipe"]) for m, spec in config["merges"].items()}
    except MoeforgeError as exc:
        raise WorkflowError(f"moeforge: {exc}") from None


RECIPES = _load_recipes()
MERGES = list(RECIPES)
REFS = {parse_ref(ref).slug: ref for r in RECIPES.values() for ref in r.source_models}
DEMO_ROOT = "resources/demo"
# Model directories `snakemake verify` checks: every merge's own output, plus config["verify"].
VERIFY = {**{m: f"results/{m}/model" for m in MERGES}, **config.get("verify", {})}


wildcard_constraints:
    merge="|".join(re.escape(m) for m in MERGES),
    slug="|".join(re.escape(s) for s in REFS),
    layer=r"\d+",


def slug(ref):
    return parse_ref(ref).slug


def merge_slugs(wildcards):
    return [slug(ref) for ref in RECIPES[wildcards.merge].source_models]


def meta_dirs(wildcards):
    return [f"resources/models/{s}/meta" for s in merge_slugs(wildcards)]


def weight_records(wildcards):
    return [f"resources/models/{s}/weights.json" for s in merge_slugs(wildcards)]


def plans_using(wildcards):
    """plan.json of every merge that uses this model."""
    return [f"results/{m}/plan.json" for m, r in RECIPES.items()
            if wildcards.slug in {slug(ref) for ref in r.source_models}]


def weight_hashes(wildcards):
    return [f"resources/models/{s}/weights.sha256.json" for s in merge_slugs(wildcards)]


def base_slug(wildcards):
    return slug(RECIPES[wildcards.merge].base_model)


def local_model_input(wildcards):
    """A local model directory is an input (so the demo rule can build it); hub refs have none."""
    ref = parse_ref(REFS[wildcards.slug])
    if ref.kind == "local" and (ref.path.startswith(f"{DEMO_ROOT}/") or Path(ref.path).is_dir()):
        return [ref.path]
    return []


def plan_of(merge):
    """plan.json of a merge, available once the validate checkpoint has run."""
    path = checkpoints.validate.get(merge=merge).output.plan
    return json.loads(Path(path).read_text())


def layer_shards(wildcards):
    plan = plan_of(wildcards.merge)
    return [f"results/{wildcards.merge}/shards/layer-{i}.safetensors" for i in range(plan["num_layers"])]


def all_shards(wildcards):
    return [f"results/{wildcards.merge}/shards/globals.safetensors"] + layer_shards(wildcards)


def all_shard_digests(wildcards):
    return [path.replace(".safetensors", ".sha256") for path in all_shards(wildcards)]


def _plan_beside(path):
    """plan.json next to a rule input, or None before the validate checkpoint has run (dry runs)."""
    plan = Path(path).with_name("plan.json")
    return json.loads(plan.read_text()) if plan.is_file() else None


def shard_mem_mb(wildcards, input, attempt):
    """A shard job holds one transformed tensor at a time plus copy buffers: scale with the shard."""
    plan = _plan_beside(input.tensors)
    key = f"layer-{wildcards.layer}" if hasattr(wildcards, "layer") else "globals"
    size = plan["shard_bytes"].get(key, 0) if plan else 0
    return int(500 + 2 * size / 2**20 / max(1, plan["num_experts"] if plan else 1)) * attempt


def smoke_mem_mb(wildcards, input, attempt):
    """The smoke test holds one model at a time, in float32 or its own dtype (see smoke_dtype)."""
    plan = _plan_beside(input.plan)
    if not plan:
        return 2000 * attempt
    size = sum(plan["shard_bytes"].values())
    dtype = smoke_dtype(plan, config.get("smoke", {}).get("dtype", "auto"))
    loaded = size * (4 if dtype == "float32" else 2) // ITEMSIZE[plan["dtype_out"]]
    return int(2000 + 1.5 * loaded / 2**20) * attempt


def layer_mem_mb(wildcards, input, attempt):
    """Layer-streamed jobs (gates) hold about one layer at a time, in float32."""
    plan = _plan_beside(input.plan)
    largest = max(plan["shard_bytes"].values()) if plan else 0
    return int(2000 + 3 * largest / 2**20) * attempt
