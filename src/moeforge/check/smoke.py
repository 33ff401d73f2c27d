"""Smoke test of an assembled MoE checkpoint.

A merged checkpoint can be wrong in ways that no shape check sees: a Mixtral that loads with
attention or norm weights silently re-initialised generates nothing useful, and a RoPE setting
translated wrongly yields fluent-looking garbage such as ``")))))"``. This module checks that the
assembled model loads the way a user would load it (strict, offline, no remote code), runs it on a
few prompts and compares it with the base model, so such builds fail here instead of after upload.

Memory stays bounded at any model size: the strict load check reads only the safetensors headers,
and the logits and router logits behind every comparison and routing figure are computed one
module at a time (``runtime.layerwise.stream_logits``). Only greedy generation loads a whole model,
and only when it fits the job's memory budget (see ``runtime.generation``); otherwise it runs one
decoder layer at a time, or, under a budget too small even for that, is skipped, and the report
says which and why.

Hard faults raise :class:`~moeforge.errors.BuildError`; soft signals (degenerate generations, a
large divergence from the base, dead experts) become warnings in the report.

Thresholds, and why:

* ``DISTINCT_RATIO_MIN = 1/3`` over at least ``DIVERSITY_MIN_TOKENS = 8`` new tokens: below it
  every token recurs three times on average, a loop of a phrase at most a third of the output
  long (five distinct tokens in sixteen). Ordinary text of that length has far more distinct
  tokens, and a model that loops a whole sentence, as small base models do under greedy
  decoding, is not flagged. Shorter outputs are too short to judge.
* ``REPEAT_MIN_TOKENS = 4``: one token repeated four times or more is the ``")))))"`` failure.
* ``DEAD_SHARE_FRACTION = 0.1``: an expert is dead in a layer when it receives less than a tenth
  of its fair share (``1/E``) of the top-k routing slots. With few prompt tokens this threshold
  falls below one slot, so it then flags exactly the experts that receive none.

Prompts run unpadded, packed into one batch in which each attends to itself alone: padding would
shift positions and add masked rows, so every statistic here is over real prompt tokens only.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import torch
import transformers

from moeforge import __version__
from moeforge.build.finite import nonfinite_counts
from moeforge.errors import BuildError, ModelError, RecipeError
from moeforge.io.files import shown_path
from moeforge.io.hf_load import load_tokenizer
from moeforge.io.progress import MIB, Progress
from moeforge.io.safetensors_file import ITEMSIZE, TORCH_NAME, read_header
from moeforge.numbers import report_number
from moeforge.plan.prompts import prompt_ids
from moeforge.runtime.devices import computes_16bit, require_device
from moeforge.runtime.generation import Generation, GenerationPlan, eos_ids, generate_all, plan_generation
from moeforge.runtime.layerwise import (
    CheckpointTensors,
    check_loadable,
    load_config,
    release_freed_memory,
    stream_sequences,
    streamed_model,
    whole_model,
)
from moeforge.runtime.memory_budget import GIB, MemoryBudget, gib, memory_budget, peak_rss
from moeforge.runtime.upcast import compute_in_float32

DISTINCT_RATIO_MIN = 1 / 3
DIVERSITY_MIN_TOKENS = 8
REPEAT_MIN_TOKENS = 4
DEAD_SHARE_FRACTION = 0.1
NAMES_SHOWN = 5
_log = logging.getLogger("moeforge")

#: Identity tolerance when the build stored the base's weights in a narrower dtype (float32 -> bfloat16),
#: relative to the largest base logit: bf16 keeps 8 bits of mantissa (0.4%), and a forward pass
#: accumulates a few roundings more.
LOW_PRECISION_IDENTITY = 0.05
#: The dtype every comparison and routing figure is computed in, one layer at a time: exact enough for
#: the identity check at any model size, the same on every device, and on CPUs without 16-bit
#: arithmetic several times faster than bfloat16 over a few dozen tokens.
COMPARISON_DTYPE = "float32"
_CONFIG_KEYS = (
    "architectures", "model_type", "dtype", "torch_dtype", "vocab_size", "hidden_size",
    "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_local_experts", "num_experts", "num_experts_per_tok", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "max_position_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "sliding_window", "use_sliding_window", "rms_norm_eps",
    "tie_word_embeddings", "bos_token_id", "eos_token_id",
)


@dataclass
class SmokeOptions:
    """What to run and how strict to be.

    ``identity`` is set when every expert is the base model, so the build must reproduce the
    base exactly. ``expert_prompts`` maps an expert name to its positive prompts and
    ``expert_names`` lists experts in router row order; both feed the routing statistics.
    ``dtype`` is what greedy generation holds a whole model in (on a CPU it computes in float32 whatever
    this is: see ``runtime.upcast``); the comparison and routing figures
    are computed in ``COMPARISON_DTYPE`` whatever it is, so the identity check holds to
    ``identity_atol`` at any size, unless the build stored the base's weights in a narrower dtype:
    the tolerance is then ``LOW_PRECISION_IDENTITY`` times the largest base logit of the prompt.
    ``memory_gb`` (the config's ``smoke.memory_gb``) and ``job_mem_mb`` (the rule's request) set
    the memory budget that decides whether greedy generation may load a whole model (see
    ``moeforge.runtime.memory_budget``). ``scanned_when_written``: the workflow's shard jobs scanned every
    byte they wrote for NaN and Inf as they hashed it for the lock, so the smoke test of
    a fresh build does not read the whole model a second time for that scan (``verify``, which
    checks models built elsewhere, scans).
    """

    prompts: list[str]
    max_new_tokens: int = 16
    device: str = "cpu"
    identity: bool = False
    identity_atol: float = 1e-4
    kl_warn: float = 1.0
    dtype: str = "float32"
    expert_prompts: dict[str, list[str]] = field(default_factory=dict)
    expert_names: list[str] = field(default_factory=list)
    memory_gb: float | None = None
    job_mem_mb: int | None = None
    scanned_when_written: bool = False


class SmokeFailure(BuildError):
    """A hard fault found after the model loaded; carries the report so it can still be read."""

    def __init__(self, what: str, where: str, fix: str, report: dict[str, Any]) -> None:
        super().__init__(what, where, fix)
        self.report = report


@dataclass
class _Measured:
    """What a model computes on the prompts, from the layer-streamed forward pass.

    ``logits`` holds one [T, V] tensor per smoke prompt; ``router_logits`` one list per routing
    text (the prompts, then the expert prompts) of [T, E] tensors, one per sparse layer, or None
    for a model without routers.
    """

    logits: list[torch.Tensor]
    router_logits: list[list[torch.Tensor]] | None
    sparse_layers: list[int]


@dataclass
class _Runs:
    """Everything measured, gathered for the report; no generations when the budget forbade them."""

    merged: _Measured
    merged_text: list[Generation] | None
    routing_texts: list[str]
    top_k: int
    eos_ids: list[int]
    base: _Measured | None = None
    base_text: list[Generation] | None = None
    #: (merged, base) stored dtypes when the merged model stores the base's weights narrower: an identity
    #: build then reproduces the base only to that rounding.
    narrowed: tuple[str, str] | None = None


_IDENTITY_FIX = ("every expert is the base model, so the build must reproduce it: compare config.json "
                 "(rope, norm eps, head_dim, sliding window) and the non-expert tensors with the base")
_FINITE_FIX = ("the weights are finite but the activations overflow: check scale and noise settings "
               "in the recipe and the dtype casts of the shards")


# ---------------------------------------------------------------------------------------------
# entry point


def run_smoke(model_dir: Path, base_dir: Path | None, opts: SmokeOptions) -> dict[str, Any]:
    """Check the assembled model in ``model_dir`` (against ``base_dir`` when given); return the report.

    Everything but generation holds one module of one model at a time; generation holds one
    whole model at a time, when the memory budget allows it, and the comparison then keeps each
    module it loads, so that model is read from disk once.
    """
    model_dir = Path(model_dir)
    base_dir = None if base_dir is None else Path(base_dir)
    _check_options(base_dir, opts)
    require_device(opts.device, "smoke.device")
    tokenizer = load_tokenizer(model_dir, BuildError, "the tokenizer",
                               "rerun the assemble step (it copies the tokenizer)")
    config = load_config(model_dir)
    prompt_ids = [_encode(tokenizer, p) for p in opts.prompts]
    _check_generation_fits(prompt_ids, opts, config.max_position_embeddings)
    scan = written_scan(model_dir) if opts.scanned_when_written else scan_tensors(model_dir)
    load_info = check_keys(model_dir)
    budget = memory_budget(opts.memory_gb, opts.job_mem_mb)
    plan = plan_generation([model_dir] if base_dir is None else [model_dir, base_dir], budget, opts.dtype,
                           upcast=not computes_16bit(opts.device))
    _log_plan(budget, plan)
    texts = _routing_texts(opts)
    eos = eos_ids(model_dir, config, tokenizer)
    generation = None if plan.mode is None else (prompt_ids, tokenizer, eos, opts.max_new_tokens)
    merged, merged_text = _run_model(model_dir, [_encode(tokenizer, t) for t in texts], len(prompt_ids), opts,
                                     generation, plan)
    runs = _Runs(merged=merged, merged_text=merged_text, routing_texts=texts,
                 top_k=int(getattr(config, "num_experts_per_tok", 1)), eos_ids=eos)
    if base_dir is not None:
        runs.narrowed = _narrowed(model_dir, base_dir) if opts.identity else None  # only the identity check uses it
        judged = runs.merged_text is not None and _base_generation_needed(runs.merged_text, eos, opts)
        runs.base, runs.base_text = _run_model(base_dir, prompt_ids, len(prompt_ids), opts,
                                               generation if judged else None, plan)
    _log.info("streamed comparison done; peak memory so far %s", gib(peak_rss()))
    report = _new_report(model_dir, base_dir, opts, load_info, scan)
    report["memory"] = {"budget_gib": None if budget.limit is None else report_number(budget.limit / GIB),
                        "budget_source": budget.source, "whole_model_gib": report_number(plan.whole / GIB),
                        "streamed_generation_gib": None if plan.streamed is None else report_number(plan.streamed / GIB),
                        "generation": plan.mode, "generation_note": plan.note,
                        "resident_layers": plan.resident.get(model_dir, 0) if plan.mode == "streamed" else None}
    failures = _fill_report(report, runs, opts)
    if failures:
        what, fix = zip(*failures)
        raise SmokeFailure("; ".join(what), str(model_dir), " / ".join(dict.fromkeys(fix)), report)
    return report


def stored_dtype(model_dir: Path) -> str:
    """The widest floating-point dtype the checkpoint stores (its safetensors name, from the headers)."""
    floats = [e.dtype for e in CheckpointTensors(model_dir).entries().values() if e.dtype in TORCH_NAME]
    return max(floats, key=ITEMSIZE.__getitem__)


def _narrowed(model_dir: Path, base_dir: Path) -> tuple[str, str] | None:
    """(merged, base) dtypes when the merged model stores its weights narrower than the base does."""
    merged, base = stored_dtype(model_dir), stored_dtype(base_dir)
    return (TORCH_NAME[merged], TORCH_NAME[base]) if ITEMSIZE[merged] < ITEMSIZE[base] else None


def _base_generation_needed(merged: list[Generation], eos: list[int], opts: SmokeOptions) -> bool:
    """Whether the base's continuations add anything: an identity build must match them token for token,
    and a degenerate merged continuation is judged by whether the base degenerates too. Otherwise the
    logit comparison already measures the divergence from the base, and a second whole-model load and
    generation would double this stage's time."""
    return opts.identity or any(degeneracy_flags(g.new_tokens, g.text, eos) for g in merged)


def _log_plan(budget: MemoryBudget, plan: GenerationPlan) -> None:
    """Put the memory budget and the plan in the log before any weight is read.

    A job killed for memory (SIGKILL) cannot report anything itself; these lines say what it was
    allowed and what it was about to load.
    """
    limit = "unknown" if budget.limit is None else gib(budget.limit)
    available = "" if budget.available is None else f", {gib(budget.available)} available on this machine"
    _log.info("memory budget %s (%s%s); peak memory so far %s; the comparison runs one layer at a time",
              limit, budget.source, available, gib(peak_rss()))
    if plan.note is not None:
        _log.warning("%s", plan.note)
    elif budget.limit is None and budget.available is None:
        _log.info("greedy generation loads one whole model at a time, about %s, unchecked: if this job is "
                  "killed for memory, set smoke.memory_gb to what it may use", gib(plan.whole))
    else:
        _log.info("greedy generation loads one whole model at a time, about %s: within the budget", gib(plan.whole))


def _run_model(model_dir: Path, ids: list[torch.Tensor], prompts: int, opts: SmokeOptions,
               generation: tuple | None, plan: GenerationPlan) -> tuple[_Measured, list[Generation] | None]:
    """Logits of the first ``prompts`` texts and router logits of all, one module in memory at a time;
    then, when ``generation`` gives the arguments of ``generate_all``, greedy continuations, with the model
    loaded whole or, for a "streamed" plan, with the layers the plan keeps loaded and the others one at a time.

    The texts are packed, unpadded, into one batch in which each attends to itself alone (see
    ``PackedSequences``): each sees what a user's single-prompt forward pass sees. To generate whole in
    the comparison's dtype, the streamed pass keeps every module it loads, so the whole model is read
    once; in another dtype, the model is read again, whole. It is freed before the next model is loaded.
    """
    keep = generation is not None and plan.mode == "whole" and opts.dtype == COMPARISON_DTYPE
    started = time.perf_counter()
    streamed = stream_sequences(model_dir, ids, device=opts.device, dtype=getattr(torch, COMPARISON_DTYPE), keep=keep)
    _log.info("ran %d texts through %s one layer at a time in %.1f s%s", len(ids), model_dir,
              time.perf_counter() - started, ", keeping the layers to generate with" if keep else "")
    routers = streamed.router_logits if streamed.sparse_layers else None
    measured = _Measured([batch[0] for batch in streamed.logits[:prompts]], routers, streamed.sparse_layers)
    if generation is None:
        return measured, None
    model = streamed.model if keep else _generation_model(model_dir, opts, plan)
    streamed.model = None
    alive = weakref.ref(model)
    try:
        return measured, generate_all(model, *generation, name=str(model_dir))
    finally:
        del model
        if alive() is not None:  # held by a reference cycle: a full collection frees it
            gc.collect()
        release_freed_memory()


def _generation_model(model_dir: Path, opts: SmokeOptions, plan: GenerationPlan) -> torch.nn.Module:
    """The model to generate with, read in the generation dtype: whole, or with the layers the plan keeps
    loaded and the others read one at a time; on a CPU computing in float32 whatever it is held in."""
    dtype = getattr(torch, opts.dtype)
    if plan.mode == "whole":
        model = whole_model(model_dir, opts.device, dtype)
    else:
        model = streamed_model(model_dir, opts.device, dtype, plan.resident.get(model_dir, 0))
    return model if computes_16bit(opts.device) or dtype == torch.float32 else compute_in_float32(model)


def _fill_report(report: dict[str, Any], runs: _Runs, opts: SmokeOptions) -> list[tuple[str, str]]:
    """Add generations, comparison and routing to ``report``; return hard faults as (what, fix)."""
    warnings: list[str] = report["warnings"]
    if runs.merged_text is None:
        warnings.append(report["memory"]["generation_note"])
        report["generations"] = None
    else:
        report["generations"] = _generations(runs.merged_text, runs.base_text, opts.prompts, runs.eos_ids, warnings)
    failures = [(what, _FINITE_FIX) for what in _finite_errors(runs.merged.logits, opts.prompts)]
    if not failures:  # with non-finite activations, comparison and routing numbers mean nothing
        if runs.base is not None:
            report["comparison"] = compare_logits(runs.base.logits, runs.merged.logits)
            findings = _comparison_findings(report["comparison"], opts, warnings, runs.narrowed)
            failures += [(what, _IDENTITY_FIX) for what in findings]
        report["routing"] = _routing(runs.merged.router_logits, runs.routing_texts, runs.merged.sparse_layers,
                                     runs.top_k, opts, warnings)
    report["errors"] = [what for what, _ in failures]
    report["passed"] = not failures
    return failures


def _check_options(base_dir: Path | None, opts: SmokeOptions) -> None:
    """Reject options that cannot produce a meaningful test before any model is loaded."""
    if not opts.prompts:
        raise RecipeError("the smoke test needs at least one prompt", "smoke.prompts",
                          "add prompts to the workflow config")
    if opts.identity and base_dir is None:
        raise RecipeError("the identity check needs the base model", "smoke",
                          "pass the base model directory")
    unknown = sorted(set(opts.expert_prompts) - set(opts.expert_names))
    if unknown:
        raise RecipeError(f"prompts given for unknown experts {unknown}", "smoke.expert_prompts",
                          f"use names from {opts.expert_names}")


def _check_generation_fits(prompt_ids: list[torch.Tensor], opts: SmokeOptions, positions: int | None) -> None:
    """Refuse, before any model is read, a generation that would run past the model's positions (a prompt
    that alone is longer, or ``max_new_tokens`` that takes the longest prompt past them)."""
    if not positions:
        return
    longest = max(ids.shape[-1] for ids in prompt_ids)
    if longest + opts.max_new_tokens > positions:
        room = positions - longest
        raise RecipeError(
            f"the longest smoke prompt is {longest} tokens; with max_new_tokens {opts.max_new_tokens} generation "
            f"would run past the model's max_position_embeddings ({positions})", "smoke.max_new_tokens",
            f"set max_new_tokens to at most {room}" if room > 0 else "shorten the smoke prompts")


# ---------------------------------------------------------------------------------------------
# loading


def scan_tensors(model_dir: Path) -> dict[str, Any]:
    """Read every tensor of the checkpoint once, in bounded chunks, and fail on NaN or Inf.

    Loading alone does not catch them: a non-finite weight loads fine and only shows as NaN
    logits, or not at all if the tensor is never used. The shard jobs ran the same scan on what
    they wrote; this one also covers a model checked by ``verify`` that was built elsewhere. It reads
    the whole model, so it reports its progress.
    """
    files = _weight_files(model_dir)
    bad: list[str] = []
    count = 0
    progress = Progress(f"{model_dir.name}: NaN/Inf scan", sum(p.stat().st_size for p in files) / MIB, "MiB read")
    for path in files:
        count += len(read_header(path)[1])
        found = nonfinite_counts(path, lambda chunk: progress.advance(len(chunk) / MIB))
        bad += [f"{name} in {path.name} ({n_bad} values)" for name, n_bad in sorted(found.items())]
    if bad:
        raise BuildError(
            f"{len(bad)} tensor(s) contain NaN or Inf: {_first(bad)}", str(model_dir),
            "check the shard that wrote them (noise/scale transforms, dtype casts) and rebuild it",
        )
    return {"files": [p.name for p in files], "tensors_scanned": count}


def _weight_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files, sorted; none is a build fault."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BuildError("no *.safetensors files", str(model_dir), "rerun the assemble step")
    return files


def written_scan(model_dir: Path) -> dict[str, Any]:
    """The scan record of a model whose shards were scanned as they were written: headers only."""
    files = _weight_files(model_dir)
    return {"files": [p.name for p in files], "tensors_scanned": sum(len(read_header(p)[1]) for p in files),
            "scanned_by": "the shard jobs as they wrote the files, and the streamed comparison as it read them"}


def check_keys(model_dir: Path) -> dict[str, Any]:
    """Fail on any tensor that would not load exactly; reads the headers only, whatever the model's size.

    transformers re-initialises missing or mis-shaped weights and only logs it; such a model
    runs and produces nonsense. The check goes through transformers' own name conversion (fused
    experts included), so it reports what ``from_pretrained`` would, by name.
    """
    try:
        outcome, parameters = check_loadable(model_dir)
    except ModelError as exc:
        raise BuildError(f"transformers cannot load the model: {exc.what}", str(model_dir),
                         "check config.json and the tensor index") from exc
    problems = [f"{len(v)} {k.replace('_', ' ')}: {_first(v)}" for k, v in outcome.problems()]
    if problems:
        raise BuildError("; ".join(problems), str(model_dir),
                         "the tensor names or shapes do not match the model class that config.json "
                         "names; a merged model must be rebuilt with the matching output template")
    return asdict(outcome) | {"parameters": parameters}


def _first(names: Sequence[str]) -> str:
    """The first few names, so a message stays readable when hundreds of keys are wrong."""
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f", ... ({len(names) - NAMES_SHOWN} more)" if len(names) > NAMES_SHOWN else "")


# ---------------------------------------------------------------------------------------------
# running prompts


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids [1, T] as a user's ``tokenizer(text)`` gives them (special tokens included; see ``prompt_ids``)."""
    ids = prompt_ids(tokenizer, text)
    if not ids:
        raise RecipeError(f"prompt {text!r} gives no tokens with the model's tokenizer", "smoke_prompts / positive_prompts",
                          "write some text in the prompt, or remove it")
    return torch.tensor([ids])


def _routing_texts(opts: SmokeOptions) -> list[str]:
    """The smoke prompts first, then each expert prompt not already among them, each once."""
    texts = list(opts.prompts)
    for name in opts.expert_names:
        texts += [t for t in opts.expert_prompts.get(name, []) if t not in texts]
    return texts


# ---------------------------------------------------------------------------------------------
# checks


def degeneracy_flags(new_tokens: Sequence[int], text: str, eos_ids: Sequence[int]) -> list[str]:
    """Name the ways a greedy continuation looks broken (empty list: looks like text)."""
    flags = []
    if new_tokens and new_tokens[0] in eos_ids:
        flags.append("immediate_eos")
    if not text.strip():
        flags.append("empty")
    content = [t for t in new_tokens if t not in eos_ids]
    if len(content) >= REPEAT_MIN_TOKENS and len(set(content)) == 1:
        flags.append("single_token_repeated")
    if len(content) >= DIVERSITY_MIN_TOKENS and len(set(content)) / len(content) < DISTINCT_RATIO_MIN:
        flags.append("low_distinct_ratio")
    return flags


def _finite_errors(logits: list[torch.Tensor], prompts: list[str]) -> list[str]:
    """Non-finite logits on any prompt: the model computes garbage whatever it generates."""
    return [f"non-finite logits on prompt {i} ({_short(prompts[i])})"
            for i, values in enumerate(logits) if not torch.isfinite(values).all()]


#: A gap between the two best logits below this share of the best one is within numerical noise: two engines
#: (or one batched and one alone) may pick either token there, and the continuations part from that step on.
TIE_SHARE = 1e-3


def near_tie(merged: Generation, base: Generation) -> dict[str, Any] | None:
    """Where two continuations first part, when either model's choice there was a near tie (its two best
    logits within TIE_SHARE of each other); else None."""
    step = next((k for k, (a, b) in enumerate(zip(merged.new_tokens, base.new_tokens)) if a != b), None)
    if step is None or step >= min(len(merged.top2), len(base.top2)):
        return None
    for who, (best, second) in (("merged", merged.top2[step]), ("base", base.top2[step])):
        if best - second <= TIE_SHARE * max(1.0, abs(best)):
            return {"step": step, "model": who, "logits": [report_number(best), report_number(second)]}
    return None


def _generations(merged: list[Generation], base: list[Generation] | None, prompts: list[str],
                 eos_ids: list[int], warnings: list[str]) -> list[dict[str, Any]]:
    """Per-prompt generated text and flags; warn when every prompt degenerates."""
    rows = []
    for i, run in enumerate(merged):
        flags = degeneracy_flags(run.new_tokens, run.text, eos_ids)
        row: dict[str, Any] = {
            "prompt": prompts[i], "text": run.text, "new_tokens": len(run.new_tokens),
            "distinct_tokens": len(set(run.new_tokens)), "flags": flags, "degenerate": bool(flags),
        }
        if base is not None:
            base_flags = degeneracy_flags(base[i].new_tokens, base[i].text, eos_ids)
            row |= {"base_text": base[i].text, "base_flags": base_flags,
                    "matches_base": base[i].new_tokens == run.new_tokens, "near_tie": near_tie(run, base[i])}
        rows.append(row)
    if all(r["degenerate"] for r in rows):
        also = ""
        if base is not None and all(r["base_flags"] for r in rows):
            also = " (so does the base model: the prompts or max_new_tokens may not suit it)"
        warnings.append(f"all {len(rows)} prompts produce degenerate output{also}")
    return rows


def compare_logits(base: list[torch.Tensor], merged: list[torch.Tensor]) -> dict[str, Any]:
    """Per prompt: mean and max KL(base || merged) over positions, top-1 agreement, max |Δlogit|."""
    prompts = []
    for b, m in zip(base, merged, strict=True):
        if b.shape != m.shape:
            raise BuildError(f"logits shape {list(m.shape)} differs from the base's {list(b.shape)}",
                             "lm_head / vocab_size", "the merged vocabulary must equal the base's")
        log_b = torch.log_softmax(b.double(), dim=-1)
        log_m = torch.log_softmax(m.double(), dim=-1)
        kl = (log_b.exp() * (log_b - log_m)).sum(dim=-1)
        diff = (b - m).abs().amax(dim=-1)
        prompts.append({
            "kl_mean": report_number(kl.mean()), "kl_max": report_number(kl.max()),
            "top1_agreement": report_number((b.argmax(-1) == m.argmax(-1)).double().mean()),
            "max_abs_logit_diff": report_number(diff.max()), "argmax_position": int(diff.argmax()),
            "max_abs_base_logit": report_number(b.abs().max()), "positions": int(b.shape[0]),
        })
    positions = sum(p["positions"] for p in prompts)
    return {
        "prompts": prompts,
        "kl_mean": report_number(sum(p["kl_mean"] * p["positions"] for p in prompts) / positions),
        "top1_agreement": report_number(sum(p["top1_agreement"] * p["positions"] for p in prompts) / positions),
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in prompts),
    }


def _comparison_findings(comparison: dict[str, Any], opts: SmokeOptions, warnings: list[str],
                         narrowed: tuple[str, str] | None) -> list[str]:
    """The identity check as an error; otherwise large divergences from the base as warnings."""
    rows = comparison["prompts"]
    if opts.identity:
        for i, row in enumerate(rows):
            tolerance = opts.identity_atol
            if narrowed is not None:
                tolerance = max(tolerance, LOW_PRECISION_IDENTITY * row["max_abs_base_logit"])
            if row["max_abs_logit_diff"] > tolerance:
                why = (f"the weights are stored in {narrowed[0]}, the base's in {narrowed[1]}" if narrowed
                       else f"computed in {COMPARISON_DTYPE}")
                return [f"identity mismatch: max |Δlogit| = {row['max_abs_logit_diff']:.4g} at prompt {i} "
                        f"({_short(opts.prompts[i])}) position {row['argmax_position']} "
                        f"(tolerance {tolerance:.3g}; {why})"]
        return []
    for i, row in enumerate(rows):
        if row["kl_mean"] > opts.kl_warn:
            warnings.append(f"prompt {i} ({_short(opts.prompts[i])}): mean KL(base || merged) = "
                            f"{row['kl_mean']:.4g} nats > {opts.kl_warn:g}")
    return []


# ---------------------------------------------------------------------------------------------
# routing


def routing_stats(runs: list[list[torch.Tensor]], top_k: int, layer_ids: list[int],
                  own: dict[str, tuple[int, list[int]]]) -> list[dict[str, Any]]:
    """Per MoE layer: top-k slot share per expert, router entropy, load entropy, own-prompt top-1.

    ``runs`` holds, per text, one [T, E] router-logit tensor per MoE layer. ``load_share[e]`` is
    the fraction of all top-k slots that expert e fills (sums to 1; uniform is 1/E), so a dead
    expert and an overloaded one read on the same scale. ``own`` maps an expert name to its
    router row and the indices of its positive prompts among ``runs``; ``own_top1[name]`` is the
    fraction of those prompts' tokens whose top-1 expert is that row.
    """
    layers = []
    for pos, layer in enumerate(layer_ids):
        per_text = [run[pos] for run in runs]
        logits = torch.cat(per_text)
        experts = logits.shape[1]
        probs = torch.softmax(logits.double(), dim=-1)
        chosen = probs.topk(min(top_k, experts), dim=-1).indices
        counts = torch.bincount(chosen.flatten(), minlength=experts).double()
        load = counts / counts.sum()
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
        layers.append({
            "layer": layer,
            "load_share": [report_number(x) for x in load],
            "router_entropy_mean": report_number(entropy.mean()),
            "load_entropy": report_number(-(load * torch.log(load.clamp_min(1e-300))).sum()),
            "own_top1": {name: report_number(_top1_fraction([per_text[t] for t in texts], row))
                         for name, (row, texts) in sorted(own.items()) if texts},
        })
    return layers


def _top1_fraction(logits: list[torch.Tensor], expert: int) -> float:
    """Fraction of the tokens in ``logits`` whose highest router logit is ``expert``."""
    top1 = torch.cat(logits).argmax(dim=-1)
    return float((top1 == expert).double().mean())


def _routing(runs: list[list[torch.Tensor] | None], texts: list[str], sparse_layers: list[int],
             top_k: int, opts: SmokeOptions, warnings: list[str]) -> dict[str, Any] | None:
    """Routing statistics over every prompt token, keyed by expert name, with dead-expert warnings."""
    if any(run is None for run in runs):
        warnings.append("the model returns no router logits: routing statistics skipped")
        return None
    if len(runs[0]) != len(sparse_layers):
        raise BuildError(f"{len(runs[0])} router outputs for {len(sparse_layers)} MoE layers",
                         "router logits", "check num_hidden_layers and mlp_only_layers in config.json")
    experts = runs[0][0].shape[1]
    names = opts.expert_names or [f"expert_{e}" for e in range(experts)]
    if len(names) != experts:
        raise BuildError(f"the model has {experts} experts but {len(names)} expert names were given",
                         "router", "the recipe and the built model disagree: rebuild")
    own = {name: (names.index(name), [texts.index(t) for t in prompts])
           for name, prompts in opts.expert_prompts.items()}
    layers = routing_stats(runs, top_k, sparse_layers, own)
    threshold = DEAD_SHARE_FRACTION / experts
    for e, name in enumerate(names):
        dead = [f"layer {row['layer']}: {row['load_share'][e]:.2%}"
                for row in layers if row["load_share"][e] < threshold]
        if dead:
            warnings.append(f"dead expert {name!r} (router row {e}): share of the top-{top_k} slots "
                            f"under {threshold:.2%} in {', '.join(dead)}")
    return {
        "experts": names, "top_k": top_k, "tokens": sum(int(run[0].shape[0]) for run in runs),
        "texts": len(texts), "max_entropy": report_number(math.log(experts)),
        "dead_share_threshold": report_number(threshold), "layers": layers,
    }


# ---------------------------------------------------------------------------------------------
# report


def _new_report(model_dir: Path, base_dir: Path | None, opts: SmokeOptions,
                load_info: dict[str, Any], scan: dict[str, Any]) -> dict[str, Any]:
    """The report skeleton: what was tested, with which software, and how it loaded."""
    return {
        "versions": {"moeforge": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "safetensors": safetensors.__version__},
        "model_dir": shown_path(model_dir),
        "base_dir": shown_path(base_dir) if base_dir is not None else None,
        "options": asdict(opts),
        "config": _config_summary(model_dir),
        "load": load_info | scan,
        "comparison": None,
        "routing": None,
        "thresholds": {"distinct_ratio_min": DISTINCT_RATIO_MIN,
                       "diversity_min_tokens": DIVERSITY_MIN_TOKENS,
                       "repeat_min_tokens": REPEAT_MIN_TOKENS,
                       "dead_share_fraction": DEAD_SHARE_FRACTION},
        "warnings": [],
    }


def _config_summary(model_dir: Path) -> dict[str, Any]:
    """The architecture keys of config.json as written on disk (what other engines will read)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return {k: config[k] for k in _CONFIG_KEYS if k in config}


def _short(text: str, width: int = 40) -> str:
    """A prompt shortened for one-line messages."""
    return repr(text if len(text) <= width else text[: width - 1] + "…")
