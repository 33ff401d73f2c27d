# Config and recipe loading, the merge table, input functions, wildcard constraints.
import json
import os
import re

from snakemake.exceptions import IncompleteCheckpointException
from snakemake.logging import logger

from moeforge import resources as job_resources
from moeforge.check.summary import eval_label, smoke_label
from moeforge.errors import MoeforgeError
from moeforge.gates.key import GATES_KEY_PATTERN, gates_key, gates_settings
from moeforge.io.lockfile import sources_state
from moeforge.io.names import relative_file_problem
from moeforge.io.published import RECIPE_FILES
from moeforge.io.refs import parse_ref
from moeforge.io.source_content import refresh_source_content
from moeforge.plan.class_check import CHECK_KEY_PATTERN, check_key, merge_check_settings
from moeforge.plan.lock_merge import merge_from_lock
from moeforge.plan.merges import merges_to_build
from moeforge.plan.plan_json import read_plan
from moeforge.plan.published_merge import merge_from_published
from moeforge.plan.recipe import load_recipe
from moeforge.plan.shard_keys import KEY_PATTERN, shard_of_key, sources_read
from moeforge.plan.table import ROUTERS_SHARD, read_rows
from moeforge.plan.train_texts import text_file
from moeforge.search.grid import searches_to_build


def _load_recipes():
    """Validate every merge's recipe at parse time: bad recipes fail before any job runs."""
    try:
        return {
            m: REBUILDS[m].recipe if m in REBUILDS else load_recipe(spec["recipe"]) for m, spec in MERGE_TABLE.items()
        }
    except MoeforgeError as exc:
        raise WorkflowError(f"moeforge: {exc}") from None


try:
    MERGE_TABLE = merges_to_build(config, Path(workflow.basedir))
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
# Searches: each candidate is a merge of its own, whose recipe the search_recipe rule writes out.
try:
    SEARCHES = searches_to_build(config, set(MERGE_TABLE))
except MoeforgeError as exc:
    raise WorkflowError(f"moeforge: {exc}") from None
CANDIDATES = {c.name: c for search in SEARCHES.values() for c in search.candidates}
for _name, _candidate in CANDIDATES.items():
    MERGE_TABLE[_name] = {"recipe": f"results/{_name}/search/recipe.yaml"}
    RECIPES[_name] = _candidate.recipe
MERGES = list(RECIPES)
REFS = {parse_ref(ref).slug: ref for r in RECIPES.values() for ref in r.source_models}
# Where the config gave each model (by slug), for a message about it: the first merge that uses it, else the
# search whose starting recipe has it, else the first candidate whose grid value names it.
REF_GIVEN_BY = {}
for _merge, _recipe in RECIPES.items():
    for _ref in [] if _merge in CANDIDATES else _recipe.source_models:
        REF_GIVEN_BY.setdefault(parse_ref(_ref).slug, f"merge {_merge}")
for _search in SEARCHES.values():
    for _ref, _where in _search.model_sources().items():
        REF_GIVEN_BY.setdefault(parse_ref(_ref).slug, _where)
DEMO_ROOT = "resources/demo"


def _refresh_local_sources():
    """Rewrite the content record of a local source whose bytes changed since the last run, even by a copy
    that kept its timestamps, so that what was built from it reruns (moeforge.io.source_content). In the
    main process only: a job's own Snakemake (on a cluster) does not hash the sources its run is using."""
    for slug_, ref in REFS.items():
        try:
            changed = refresh_source_content(
                ref, Path(f"resources/models/{slug_}/content.json"), Path(f"resources/models/{slug_}/sha256-cache.json")
            )
        except MoeforgeError as exc:
            raise WorkflowError(f"moeforge: {exc}") from None
        if changed:
            logger.info(
                f"moeforge: {ref}: {', '.join(changed)} changed since the last run; "
                "what was built from it will be rebuilt"
            )


if workflow.is_main_process:
    _refresh_local_sources()

# Model directories `snakemake verify` checks: every merge's own output, plus config["verify"].
VERIFY = {**{m: f"results/{m}/model" for m in MERGES}, **config.get("verify", {})}


def one_of(names):
    """A wildcard regex matching exactly these names; one that matches nothing when there are none."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


wildcard_constraints:
    merge=one_of(MERGES),
    slug="|".join(re.escape(s) for s in REFS),
    # The shard rule's: a shard read from the sources, by what it holds (plan.json's shard_keys).
    key=KEY_PATTERN,
    # The gates rule's: the gates, by what they are computed from (moeforge.gates.key).
    gates_key=GATES_KEY_PATTERN,
    check_key=CHECK_KEY_PATTERN,


def slug(ref):
    return parse_ref(ref).slug


def merge_slugs(wildcards):
    return [slug(ref) for ref in RECIPES[wildcards.merge].source_models]


def meta_dirs(wildcards):
    return [f"resources/models/{s}/meta" for s in merge_slugs(wildcards)]


def weight_records(wildcards):
    """This merge's fetch_weights records of its models: where each one's weights are, sizes and sha256."""
    return [f"results/{wildcards.merge}/weights/{s}.json" for s in merge_slugs(wildcards)]


def routers_source(merge):
    """The routers' file: the trained routers when the recipe trains them, else the gates."""
    trained = RECIPES[merge].router_training is not None
    return f"results/{merge}/routers/trained.safetensors" if trained else gates_of(merge, ".safetensors")


def gates_of(merge, suffix):
    """The merge's gates (``.safetensors``) or their statistics (``.json``), named by what they are computed from:
    merges that differ only in keys the gates do not read (experts_per_token, router training...) share them."""
    return f"results/gates/{gates_key(plan_of(merge))}{suffix}"


def train_texts(wildcards):
    """The recipe's train_texts that are there or that the demo writes; one missing is the validate job's to
    report (naming its expert, before any weight is fetched), not a missing-input error."""
    demo = set(map(str, rules.demo_texts.output))
    recipe = RECIPES[wildcards.merge]
    paths = [path for group in recipe.gate_groups() for path in group.train_texts]
    return [
        str(text_file(path))
        for path in dict.fromkeys(paths)
        if os.path.normpath(path) in demo or text_file(path).is_file()
    ]


def router_training_report(wildcards):
    """The router training report, whose text records the lock keeps; nothing without router_training."""
    trained = RECIPES[wildcards.merge].router_training is not None
    return [f"results/{wildcards.merge}/routers/report.json"] if trained else []


def verify_inputs(wildcards):
    """A model to verify: its lock, and every file the lock lists that is there (a missing file, or a lock
    that cannot be read, is the verify job's to report, naming it)."""
    model = Path(VERIFY[wildcards.name])
    lock = model / "moeforge.lock.json"
    try:
        listed = sorted(json.loads(lock.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = []
    return [
        str(lock),
        *(str(model / name) for name in listed if relative_file_problem(name) is None and (model / name).is_file()),
    ]


def weight_hashes(wildcards):
    """The records that carry the sha256 of the merge's source weights, for the lock: fetch_weights' records."""
    return weight_records(wildcards)


def base_slug(wildcards):
    return base_slug_of(wildcards.merge)


def base_weight_record(wildcards):
    return f"results/{wildcards.merge}/weights/{base_slug(wildcards)}.json"


def base_slug_of(merge):
    return slug(RECIPES[merge].base_model)


def dense_provider(wildcards):
    """The merge whose fetched weights a dense model is scored from: the first (in the config's order) that has
    the model as a source and the tokenizer's model as its base."""
    return next(
        m
        for m in MERGES
        if base_slug_of(m) == wildcards.tokenizer and wildcards.slug in map(slug, RECIPES[m].source_models)
    )


def dense_scores(wildcards):
    """The score_dense records of a merge's base and experts (by slug), on windows of the base's tokenizer."""
    tokenizer = base_slug(wildcards)
    models = [tokenizer, *(slug(e.source_model) for e in RECIPES[wildcards.merge].experts)]
    return {s: f"resources/models/{s}/eval/{tokenizer}/{EVAL_KEY}.json" for s in models}


def fetch_weights_priority(wildcards):
    """A merge's base before its experts: the gates job waits for the base's weights alone."""
    return 11 if wildcards.slug == base_slug(wildcards) else 10


def source_content(wildcards):
    """A local model's content record (rule hash_source); nothing for a Hub model (its commit is its content)."""
    local = parse_ref(REFS[wildcards.slug]).kind == "local"
    return [f"resources/models/{wildcards.slug}/content.json"] if local else []


def hash_cache(wildcards):
    """The model's stat-validated sha256 cache (moeforge.io.hashcache): a cache, not a rule output."""
    return f"resources/models/{wildcards.slug}/sha256-cache.json"


def demo_model_dir(wildcards):
    """A demo model's directory, which the demo rule builds; nothing for any other local model.

    Any other path under the demo's directory is an ordinary local path: one that does not exist gets
    hash_source's message (naming it, and the nearest model directory), not a missing-input error.
    """
    ref = REFS[wildcards.slug]
    return [ref] if os.path.normpath(ref) in map(str, rules.demo_models.output) else []


def merge_title(wildcards):
    """The name a merge's plan, card and lock carry: a `lock:` merge is the recorded merge, built again."""
    return LOCKS[wildcards.merge].name if wildcards.merge in LOCKS else wildcards.merge


# The merge whose uncounted jobs the run mentioned first: once for the run, not once per merge (a search of 200
# candidates would say it 200 times).
_UNCOUNTED = set()


def plan_of(merge):
    """plan.json of a merge, available once the validate checkpoint has run.

    Until then Snakemake can count none of the merge's shard jobs (how many depends on the models' layers
    and sizes, which validate reads) nor its gates and class check jobs (named by what the plan holds), so
    the step count it shows grows by them once validate has run: the run says so once, as the count is first
    shown, so a dry run's count and a growing one surprise no one."""
    try:
        return read_plan(Path(checkpoints.validate.get(merge=merge).output.plan))
    except IncompleteCheckpointException:
        if not _UNCOUNTED:
            _UNCOUNTED.add(merge)
            logger.info(
                "moeforge: the step count leaves out each merge's shard jobs (the globals, the routers, one per run "
                "of decoder layers; one job for a shard several merges share), its gates job and its class check job "
                "(one for the merges that share them); its validate job names them once it has read the models, and "
                "the count grows by them then"
            )
        raise


def all_shards(wildcards):
    """The merge's shard files, in the order assembly numbers them: those read from the sources under their key
    (shared by every merge that needs them), the routers under the merge."""
    plan = plan_of(wildcards.merge)
    return [
        (
            f"results/shards/{plan.shard_keys[shard]}.safetensors"
            if shard in plan.shard_keys
            else f"results/{wildcards.merge}/shards/{shard}.safetensors"
        )
        for shard in plan.shards
    ]


def shards_but_routers(wildcards):
    """The merge's shards that router training reads: all but the routers shard, which it comes before."""
    shards = plan_of(wildcards.merge).shards
    return [path for shard, path in zip(shards, all_shards(wildcards), strict=True) if shard != ROUTERS_SHARD]


def all_shard_digests(wildcards):
    return [path.replace(".safetensors", ".sha256") for path in all_shards(wildcards)]


def shard_provider(wildcards):
    """The merge whose plan gives a keyed shard its rows (see first_merge_with)."""
    return first_merge_with(
        lambda merge: wildcards.key in plan_of(merge).shard_keys.values(),
        f"results/shards/{wildcards.key}.safetensors: no merge of this run needs this shard (its key is not in any "
        "merge's plan.json)",
    )


def searches_to_rank(wildcards):
    """Every search's ranking; asked for with no search configured, the target says so instead of doing nothing
    (a --configfile left out, or the wrong file given)."""
    if not SEARCHES:
        raise WorkflowError(
            "moeforge: snakemake search: the config lists no search -> give a config file with searches: "
            "(snakemake search --cores 8 --configfile my.yaml; docs/search.md)"
        )
    return expand("results/search/{name}/ranking.json", name=SEARCHES)


def first_merge_with(wanted, what):
    """The first merge (in the config's order) that is ``wanted`` (a test of its name that reads its plan): it
    provides a job that several merges share, and the choice does not depend on which plans happen to be written
    already. ``what``: the error's words when no merge is (the file asked for, and that no merge needs it)."""
    for merge in MERGES:
        if wanted(merge):
            return merge
    raise WorkflowError(f"moeforge: {what}; ask for a merge's model instead")


def shard_rows(wildcards):
    """A keyed shard's plan rows, passed to its job as a parameter: its inputs are then no merge's files, so a
    run with other merges that need it (another config) finds it as it left it (the same rows, the same inputs)."""
    return read_rows(Path(f"results/{shard_provider(wildcards)}/plan.tensors.tsv"), shard_of_key(wildcards.key))


def shard_weight_records(wildcards):
    """Where the sources a keyed shard reads are (see source_weight_record)."""
    merge = shard_provider(wildcards)
    return [source_weight_record(merge, s) for s in sources_read(shard_rows(wildcards))]


def source_weight_record(merge, slug):
    """Where a source's weights are, for a job shared by merges: a local model's located record (every merge's),
    a Hub model's weights as ``merge`` (the first that needs them) fetched them (downloaded, on the submit host)."""
    local = plan_of(merge).sources[slug].kind == "local"
    return f"resources/models/{slug}/weights.json" if local else f"results/{merge}/weights/{slug}.json"


def gates_provider(wildcards):
    """The merge whose plan gives the gates job its settings (see first_merge_with)."""
    return first_merge_with(
        lambda merge: gates_key(plan_of(merge)) == wildcards.gates_key,
        f"results/gates/{wildcards.gates_key}.safetensors: no merge of this run computes these gates",
    )


def gates_job_settings(wildcards):
    """What the gates are computed from (moeforge.gates.key): the job's parameter, the same for every merge that
    shares them, so a run of another config finds the job as it left it."""
    return gates_settings(plan_of(gates_provider(wildcards)))


def gates_base_weights(wildcards):
    merge = gates_provider(wildcards)
    return source_weight_record(merge, plan_of(merge).base)


def gates_mem_mb(wildcards, input, attempt):
    return job_resources.layer_mem_mb(plan_of(gates_provider(wildcards))) * attempt


# Each merge's class check settings, by the plan.json they were built from: Snakemake asks for them several
# times per job, and the class_check job's provider is found by comparing every merge's.
_CHECK_SETTINGS = {}


def class_check_settings(merge):
    """What the merge's class check reads (moeforge.plan.class_check): its config as translate_config builds it
    and its planned shapes, once validate has written them."""
    plan = Path(checkpoints.validate.get(merge=merge).output.plan)
    stamp = (merge, plan.stat().st_mtime_ns)
    if stamp not in _CHECK_SETTINGS:
        meta = Path(f"resources/models/{base_slug_of(merge)}/meta")
        _CHECK_SETTINGS[stamp] = merge_check_settings(plan, plan.with_name("plan.tensors.tsv"), meta)
    return _CHECK_SETTINGS[stamp]


def class_check_of(wildcards):
    """The record of the merge's class check, named by its settings."""
    return f"results/class_checks/{check_key(class_check_settings(wildcards.merge))}.json"


def class_check_provider(wildcards):
    """The merge whose settings the class_check job takes (see first_merge_with)."""
    return first_merge_with(
        # By the merge's name in this run: a plan rebuilt from a lock carries the locked merge's name.
        lambda merge: check_key(class_check_settings(merge)) == wildcards.check_key,
        f"results/class_checks/{wildcards.check_key}.json: no merge of this run has this class check",
    )


def class_check_base_meta(wildcards):
    return f"resources/models/{base_slug_of(class_check_provider(wildcards))}/meta"


def class_check_job_settings(wildcards):
    """The class_check job's parameter: its provider's settings, the same for every merge with its key."""
    return class_check_settings(class_check_provider(wildcards))


def _plan_beside(path):
    """plan.json next to a rule input, or None before the validate checkpoint has run (dry runs)."""
    plan = Path(path).with_name("plan.json")
    return read_plan(plan) if plan.is_file() else None


def shard_mem_mb(wildcards, input, attempt):
    plan = _plan_beside(f"results/{shard_provider(wildcards)}/plan.json")
    return job_resources.shard_mem_mb(plan, shard_of_key(wildcards.key)) * attempt


def routers_mem_mb(wildcards, input, attempt):
    return job_resources.shard_mem_mb(_plan_beside(input.plan), ROUTERS_SHARD) * attempt


def smoke_mem_mb(wildcards, input, attempt):
    return job_resources.smoke_mem_mb(_plan_beside(input.plan), lookup(dpath="smoke/dtype", within=config)) * attempt


def eval_mem_mb(wildcards, input, attempt):
    return job_resources.eval_mem_mb(_plan_beside(input.plan)) * attempt


def dense_eval_mem_mb(wildcards, input, attempt):
    """Sized by the plan of the merge whose weights are scored (its MoE layers are larger than a dense one's)."""
    return job_resources.eval_mem_mb(_plan_beside(f"results/{dense_provider(wildcards)}/plan.json")) * attempt


def reproduce_mem_mb(wildcards, input, attempt):
    return job_resources.reproduce_mem_mb(_plan_beside(input.plan)) * attempt


def published_compare_mem_mb(wildcards, input, attempt):
    """One tensor pair for the tensor comparison, one layer of each model for the next-token one."""
    return max(reproduce_mem_mb(wildcards, input, attempt), layer_mem_mb(wildcards, input, attempt))


def smoke_threads(wildcards, input):
    """The smoke test's threads: the plan's (moeforge.resources.smoke_threads), not the cores given to the job."""
    max_new_tokens = lookup(dpath="smoke/max_new_tokens", within=config)
    return job_resources.smoke_threads(_plan_beside(input.plan), max_new_tokens)


def train_threads(wildcards, input):
    """Router training's threads: the plan's (moeforge.resources.train_threads), not the cores given to the job."""
    return job_resources.train_threads(_plan_beside(input.plan))


def train_mem_mb(wildcards, input, attempt):
    return job_resources.train_mem_mb(_plan_beside(input.plan)) * attempt


def layer_mem_mb(wildcards, input, attempt):
    return job_resources.layer_mem_mb(_plan_beside(input.plan)) * attempt


def figure_labels(figure, verdict):
    """A figure's labels in `snakemake --report`, which calls this with the job's output when it makes the page
    (after the run): the merge, the figure, and ``verdict`` (moeforge.check.summary) of the job's report."""

    def labels(wildcards, output):
        return {"merge": wildcards.merge, "figure": figure, "verdict": verdict(Path(output.json))}

    return labels
