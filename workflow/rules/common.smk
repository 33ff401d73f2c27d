# Config and recipe loading, the merge table, input functions, wildcard constraints.
import json
import os
import re

from moeforge import resources as job_resources
from moeforge.errors import MoeforgeError
from moeforge.io.fetch import local_source_files
from moeforge.io.published import RECIPE_FILES
from moeforge.io.refs import parse_ref
from moeforge.plan.lock_merge import merge_from_lock
from moeforge.plan.merges import merges_to_build
from moeforge.plan.published_merge import merge_from_published
from moeforge.plan.recipe import load_recipe
from moeforge.plan.table import ROUTERS_SHARD
from moeforge.scheduler_exit import cancel_rescheduling_timers

# Every job inherits this environment. torch then backs large tensors with transparent huge pages
# (it reads the variable when imported): the smoke test keeping a 7 GB MoE for generation spent
# most of its loading time faulting in 4 KiB pages (1B-class MoE: 15.1 s -> 9.8 s, warm cache).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


# The workflow is over when these hooks run: end the process now, not when Snakemake's last
# re-scheduling timer fires (up to 1 s later; see moeforge.scheduler_exit).
onsuccess:
    cancel_rescheduling_timers()


onerror:
    cancel_rescheduling_timers()


def _load_recipes():
    """Validate every merge's recipe at parse time: bad recipes fail before any job runs."""
    try:
        return {
            m: REBUILDS[m].recipe if m in REBUILDS else load_recipe(spec["recipe"]) for m, spec in MERGE_TABLE.items()
        }
    except MoeforgeError as exc:
        raise WorkflowError(f"moeforge: {exc}") from None


try:
    MERGE_TABLE = merges_to_build(config)
    # `lock:` merges: the lock read and checked now; its pinned recipe is written by the lock_recipe rule.
    LOCKS = {m: merge_from_lock(spec["lock"]) for m, spec in MERGE_TABLE.items() if "lock" in spec}
    # `published:` merges: the recipe found in the repo now; the published_recipe rule writes it out.
    PUBLISHED = {m: merge_from_published(spec["published"]) for m, spec in MERGE_TABLE.items() if "published" in spec}
except MoeforgeError as exc:
    raise WorkflowError(f"moeforge: {exc}") from None
REBUILDS = {**LOCKS, **PUBLISHED}
for _merge in REBUILDS:
    MERGE_TABLE[_merge] = {**MERGE_TABLE[_merge], "recipe": f"results/{_merge}/reproduce/recipe.yaml"}
RECIPES = _load_recipes()
MERGES = list(RECIPES)
REFS = {parse_ref(ref).slug: ref for r in RECIPES.values() for ref in r.source_models}
DEMO_ROOT = "resources/demo"
# Model directories `snakemake verify` checks: every merge's own output, plus config["verify"].
VERIFY = {**{m: f"results/{m}/model" for m in MERGES}, **config.get("verify", {})}


def one_of(names):
    """A wildcard regex matching exactly these names; one that matches nothing when there are none."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


wildcard_constraints:
    merge=one_of(MERGES),
    slug="|".join(re.escape(s) for s in REFS),
    # The shard rule's (plan.json names them).
    shard=rf"globals|layers-\d+-\d+|{re.escape(ROUTERS_SHARD)}",


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
    return [
        f"results/{m}/plan.json" for m, r in RECIPES.items() if wildcards.slug in {slug(ref) for ref in r.source_models}
    ]


def shard_weight_records(wildcards):
    """The source models' weight records a shard reads: none for the routers, which come from the gates."""
    return [] if wildcards.shard == ROUTERS_SHARD else weight_records(wildcards)


def shard_gates(wildcards):
    """The gates file, for the routers shard alone."""
    return [f"results/{wildcards.merge}/gates.safetensors"] if wildcards.shard == ROUTERS_SHARD else []


def verify_inputs(wildcards):
    """A model to verify: its lock, and every file the lock lists that is there (a missing file, or a lock
    that cannot be read, is the verify job's to report, naming it)."""
    model = Path(VERIFY[wildcards.name])
    lock = model / "moeforge.lock.json"
    try:
        listed = sorted(json.loads(lock.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = []
    return [str(lock), *(str(model / name) for name in listed if (model / name).is_file())]


def weight_hashes(wildcards):
    return [f"resources/models/{s}/weights.sha256.json" for s in merge_slugs(wildcards)]


def base_slug(wildcards):
    return slug(RECIPES[wildcards.merge].base_model)


def fetch_weights_priority(wildcards):
    """A merge's base before its experts: the gates job waits for the base's weights alone."""
    bases = {slug(recipe.base_model) for recipe in RECIPES.values()}
    return 11 if wildcards.slug in bases else 10


def local_model_input(wildcards):
    """A local model's files (an edit in place reruns what used them); a demo model's directory (built here).

    Any other path under the demo's directory is an ordinary local path: one that does not exist gets
    fetch_metadata's message (naming it, and the nearest model directory), not a missing-input error.
    """
    ref = REFS[wildcards.slug]
    if os.path.normpath(ref) in map(str, rules.demo_models.output):
        return [ref]
    return local_source_files(ref)


def merge_title(wildcards):
    """The name a merge's plan, card and lock carry: a `lock:` merge is the recorded merge, built again."""
    return LOCKS[wildcards.merge].name if wildcards.merge in LOCKS else wildcards.merge


def plan_of(merge):
    """plan.json of a merge, available once the validate checkpoint has run."""
    path = checkpoints.validate.get(merge=merge).output.plan
    return json.loads(Path(path).read_text())


def all_shards(wildcards):
    """The merge's shard files, in the order assembly numbers them."""
    return [f"results/{wildcards.merge}/shards/{shard}.safetensors" for shard in plan_of(wildcards.merge)["shards"]]


def all_shard_digests(wildcards):
    return [path.replace(".safetensors", ".sha256") for path in all_shards(wildcards)]


def _plan_beside(path):
    """plan.json next to a rule input, or None before the validate checkpoint has run (dry runs)."""
    plan = Path(path).with_name("plan.json")
    return json.loads(plan.read_text()) if plan.is_file() else None


def shard_mem_mb(wildcards, input, attempt):
    return job_resources.shard_mem_mb(_plan_beside(input.plan), wildcards.shard) * attempt


def smoke_mem_mb(wildcards, input, attempt):
    return job_resources.smoke_mem_mb(_plan_beside(input.plan), lookup(dpath="smoke/dtype", within=config)) * attempt


def eval_mem_mb(wildcards, input, attempt):
    return job_resources.eval_mem_mb(_plan_beside(input.plan)) * attempt


def reproduce_mem_mb(wildcards, input, attempt):
    return job_resources.reproduce_mem_mb(_plan_beside(input.plan)) * attempt


def published_compare_mem_mb(wildcards, input, attempt):
    """One tensor pair for the tensor comparison, one layer of each model for the next-token one."""
    return max(reproduce_mem_mb(wildcards, input, attempt), layer_mem_mb(wildcards, input, attempt))


def gates_threads(wildcards, input):
    return job_resources.gates_threads(_plan_beside(input.plan))


def layer_mem_mb(wildcards, input, attempt):
    return job_resources.layer_mem_mb(_plan_beside(input.plan)) * attempt
