"""Resource requests of the workflow's jobs, derived from plan.json (the single truth).

Imported by the workflow at parse time: no torch, no pandas. Before the validate checkpoint
has run (a dry run) there is no plan, and each request falls back to its floor.
"""

from __future__ import annotations

from moeforge.io.progress import MIB
from moeforge.io.safetensors_file import ITEMSIZE, TORCH_NAME
from moeforge.memory_need import whole_model_mb
from moeforge.plan.plan_json import Plan
from moeforge.plan.prompts import smoke_prompts
from moeforge.plan.recipe import Recipe
from moeforge.plan.training_memory import end_to_end_bytes

#: Above this float32 footprint the smoke test generates in the model's own dtype.
FLOAT32_SMOKE_LIMIT = 8 << 30
#: The evaluation streams its windows in chunks whose float32 logits stay under this size.
EVAL_LOGITS_CHUNK_BYTES = 256 * MIB


def smoke_dtype(plan: Plan, requested: str, computes_16bit: bool = False) -> str:
    """The dtype the smoke test of the merge ``plan`` describes holds its model in (see ``generation_dtype``)."""
    return generation_dtype(plan.dtype_out, plan.total_bytes, requested, computes_16bit)


def generation_dtype(stored: str, stored_bytes: int, requested: str, computes_16bit: bool = False) -> str:
    """The dtype greedy generation holds a whole model in, for weights of ``stored_bytes`` in the
    safetensors dtype ``stored`` (the comparison runs in float32, one layer at a time, whatever this is):
    ``requested``, or for ``auto`` the model's own dtype, as users run it, on a device that computes in
    it (an accelerator: ``runtime.devices.computes_16bit``); on a CPU float32 while the float32 copy
    stays under FLOAT32_SMOKE_LIMIT, else the model's own dtype.

    A CPU computes in float32 whatever the model is held in (a 16-bit model one decoder layer upcast at
    a time, ``runtime.upcast``), so every CPU generates the same tokens; holding the model in float32
    while it fits saves that upcast on every new token, and that model is the one the comparison's
    streamed pass keeps, read once.

    Called without ``computes_16bit`` (at parse time, where the job's device is unknown), the answer is
    the dtype the job's memory is requested for: float32 while small.
    """
    if requested != "auto":
        return requested
    if computes_16bit:
        return TORCH_NAME[stored]
    return "float32" if stored_bytes * 4 // ITEMSIZE[stored] <= FLOAT32_SMOKE_LIMIT else TORCH_NAME[stored]


def shard_mem_mb(plan: Plan | None, shard: str) -> int:
    """A shard job holds one transformed tensor at a time plus copy buffers: scale with a layer's (or the
    globals') bytes over the experts."""
    if not plan:
        return 500
    per_shard = plan.shard_bytes["globals"] if shard == "globals" else plan.layer_bytes
    return int(500 + 2 * per_shard / MIB / max(1, plan.num_experts))


def smoke_mem_mb(plan: Plan | None, requested_dtype: str) -> int:
    """Enough for greedy generation, which loads one whole model at a time in the dtype of smoke_dtype
    (float32 while small, whatever the job's device); the rest of the smoke test runs one layer at a
    time, and generation is skipped when a smaller request is granted (see moeforge.runtime.memory_budget)."""
    if not plan:
        return 2000
    dtype = smoke_dtype(plan, requested_dtype)
    return whole_model_mb(plan.total_bytes * (4 if dtype == "float32" else 2) // ITEMSIZE[plan.dtype_out])


#: Threads of the gate job when its forward pass is large; and the forward-pass work (floating-point
#: operations) below which one thread does it in a few seconds. The job then takes one core and runs
#: beside the shard jobs, instead of waiting until every core is free; most of its time is imports
#: and reading the base's weights, which more threads do not speed up.
GATE_THREADS = 4
ONE_THREAD_GATE_FLOPS = 5e11
#: Modes that run no forward pass: seeded noise, or the embedding table alone.
NO_FORWARD_GATE_MODES = ("random", "uniform_random", "cheap_embed")


def gates_threads(plan: Plan | None) -> int:
    """One thread unless the base's forward pass over all prompts is heavy (~2 x params x tokens)."""
    if not plan:
        return GATE_THREADS
    recipe = plan.recipe
    if recipe.gate_mode in NO_FORWARD_GATE_MODES:
        return 1
    prompts = [text for e in recipe.experts + recipe.shared_experts for text in e.positive_prompts + e.negative_prompts]
    tokens = sum(len(text) for text in prompts) / 3 + 8 * len(prompts)  # a generous guess, template included
    return _threads_for(_forward_flops(plan, tokens, mlps_per_token=1))


def train_threads(plan: Plan | None) -> int:
    """Router training's threads: one unless its passes over the MoE are heavy. Each training token goes through
    every layer with ``experts_per_token`` experts' MLPs (end_to_end: forward and backward, each step)."""
    if not plan or plan.recipe.router_training is None:
        return GATE_THREADS
    settings = plan.recipe.router_training
    tokens = settings.tokens_per_expert * len(plan.recipe.gate_groups())
    if settings.method == "end_to_end":
        tokens = 3 * settings.steps * settings.batch_size * settings.seq_len
    return _threads_for(_forward_flops(plan, tokens, mlps_per_token=plan.recipe.experts_per_token))


def smoke_threads(plan: Plan | None, max_new_tokens: int) -> int:
    """The smoke test's threads: one unless its passes are heavy. The merged MoE (``experts_per_token`` MLPs a
    token) and the base each read every smoke and expert prompt (taken as 64 tokens) and generate the new tokens
    after each smoke prompt. On a small model the job is its imports, and one thread lets the next candidate's
    jobs of a search run beside it."""
    if not plan:
        return GATE_THREADS
    recipe = plan.recipe
    prompts = smoke_prompts(recipe)
    tokens = 64 * (len(prompts) + sum(len(e.positive_prompts) for e in recipe.experts))
    tokens += len(prompts) * (recipe.max_new_tokens or max_new_tokens)
    flops = _forward_flops(plan, tokens, mlps_per_token=recipe.experts_per_token) + _forward_flops(plan, tokens, 1)
    return _threads_for(flops)


def _forward_flops(plan: Plan, tokens: float, mlps_per_token: int) -> float:
    """Floating-point operations of ``tokens`` through every decoder layer (~2 x the weights each token meets)."""
    p = plan.base_params
    hidden = p["hidden_size"]
    layer_params = 4 * hidden * hidden + 3 * hidden * p["intermediate_size"] * mlps_per_token
    return 2 * p["num_hidden_layers"] * layer_params * tokens


def _threads_for(flops: float) -> int:
    """The thread count a job of ``flops`` asks for; a function of the plan alone, never of the cores given, so a
    rerun sums in the same order and gives the same bytes."""
    return 1 if flops < ONE_THREAD_GATE_FLOPS else GATE_THREADS


def layer_mem_mb(plan: Plan | None) -> int:
    """Layer-streamed jobs (gates) hold about one layer, or the embedding, at a time, in float32."""
    largest = max(plan.layer_bytes, plan.shard_bytes["globals"]) if plan else 0
    return int(2000 + 3 * largest / MIB)


def eval_mem_mb(plan: Plan | None) -> int:
    """Layer-streamed like the gates, plus one chunk of logits and its float64 log-softmax."""
    return layer_mem_mb(plan) + 3 * EVAL_LOGITS_CHUNK_BYTES // MIB


def reproduce_mem_mb(plan: Plan | None) -> int:
    """The comparison holds one tensor of each model: the largest is an embedding (in globals) or one expert's
    matrix (about a layer over its experts)."""
    if not plan:
        return 1000
    largest = max(plan.shard_bytes["globals"], plan.layer_bytes / max(1, plan.num_experts))
    return int(1000 + 2.5 * largest / MIB)


#: Peak bytes per kept token while a training text is read: the tokenizer's encoding (ids, offsets, token
#: strings) of the text read, up to about twice the tokens kept; 1.7 KiB was measured with the demo's byte-level
#: BPE at 10^6 tokens per expert (about 2 GB, where 8192 tokens cost nothing to speak of).
TEXT_READ_BYTES_PER_TOKEN = 2048


def text_read_mb(recipe: Recipe) -> int:
    """Memory to read one gate row's training texts: validation and training read them one row at a time, as
    far as ``tokens_per_expert``."""
    settings = recipe.router_training
    return 0 if settings is None else int(settings.tokens_per_expert * TEXT_READ_BYTES_PER_TOKEN / MIB)


def validate_mem_mb(recipe: Recipe) -> int:
    """Validation reads metadata and, with router training, each row's texts as training will."""
    return 2000 + text_read_mb(recipe)


def train_mem_mb(plan: Plan | None) -> int:
    """Router training: ``layerwise`` streams like the gates and holds its windows' activations (hidden states,
    the captured router inputs and their float32 copy: 4 x tokens x hidden); ``end_to_end`` holds the whole model
    in float32 (the job refuses itself, with the numbers, when its budget is smaller); both read the texts first."""
    if not plan or plan.recipe.router_training is None:
        return layer_mem_mb(plan)
    settings = plan.recipe.router_training
    if settings.method == "end_to_end":
        return int(end_to_end_bytes(plan) / MIB) + 1 + text_read_mb(plan.recipe)
    activations = 4 * 4 * settings.tokens_per_expert * len(plan.recipe.gate_groups()) * plan.hidden_size
    return layer_mem_mb(plan) + int(activations / MIB) + text_read_mb(plan.recipe)
