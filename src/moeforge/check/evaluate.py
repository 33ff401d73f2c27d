"""How close the merged model comes to the best dense expert on each domain, and where tokens go.

A frankenMoE is worth building when its routers send each kind of text to the expert that is good
at it. This module measures that on held-out text of each domain: the perplexity of the base, of
every dense expert, of the MoE and of the oracle (on each domain, the best dense expert), and the
share of each domain's tokens that each expert receives.

Memory stays bounded as in the smoke test: every model runs one module at a time, in float32
(``gates.layerwise.stream_logits``), once for all domains; the windows go through in chunks whose
logits fit ``moeforge.resources.EVAL_LOGITS_CHUNK_BYTES``, one chunk's logits at a time.

The dense models' scores depend only on the model, the windows and the options, not on the merge: the
workflow computes them once per model (``dense_stage``, shared by every merge over the same experts and
base) and each merge's evaluation scores its MoE and reads them (``eval_stage``).

Perplexity is over fixed windows: each domain's text is tokenised once (no special tokens), cut
into windows of ``context - 1`` tokens, each read after the bos token (as a user's
``tokenizer(text)`` would give it for a Llama-style tokenizer) and scored on every token it
predicts. A tail shorter than a window is left out, so every model sees exactly the same tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from moeforge import __version__
from moeforge.errors import BuildError, RecipeError
from moeforge.io.fetch import weight_dirs_from
from moeforge.io.files import read_json, shown_path, write_json, write_text
from moeforge.io.hf_load import load_tokenizer
from moeforge.io.text_prefix import prefix_ids
from moeforge.numbers import fmt, report_number
from moeforge.plan.plan_json import read_plan
from moeforge.resources import EVAL_LOGITS_CHUNK_BYTES
from moeforge.runtime.devices import require_device
from moeforge.runtime.layerwise import load_config, stream_logits

_DOMAIN_FIX = "give eval.domains a UTF-8 text file with at least one window of tokens per domain"


@dataclass(frozen=True)
class EvalOptions:
    """``context``: tokens per window, bos included; ``max_tokens``: at most this many tokens of each
    domain's text are used (the first ones), so the cost of the stage does not grow with the file."""

    context: int = 128
    max_tokens: int = 4096
    device: str = "cpu"


@dataclass
class Scores:
    """What one model computes on one domain: summed negative log-likelihood and routing counts.

    ``top1[e]`` counts tokens whose highest router logit is expert e; ``slots[e]`` the top-k
    routing slots expert e fills; both summed over every MoE layer (None for a dense model).
    """

    nll: float
    predicted: int
    top1: torch.Tensor | None = None
    slots: torch.Tensor | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.predicted)


def domain_windows(ids: list[int], bos: int | None, opts: EvalOptions, where: str) -> torch.Tensor:
    """The evaluation windows of one domain's tokens, [N, context] token ids."""
    prefix = [] if bos is None else [bos]
    width = opts.context - len(prefix)
    count = len(ids) // width
    if count == 0:
        raise RecipeError(f"{len(ids)} tokens, fewer than one window of {width}", where, _DOMAIN_FIX)
    return torch.tensor([prefix + ids[i * width:(i + 1) * width] for i in range(count)], dtype=torch.long)


def domain_ids(tokenizer: Any, name: str, path: Path, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` tokens of a domain's text, reading only as much of the file as they need, so
    the memory and time of the stage do not grow with the file (a missing or undecodable file is one error
    naming the domain)."""
    if not path.is_file():
        raise RecipeError("no such file", f"eval domain {name} ({path})", _DOMAIN_FIX)
    return prefix_ids(tokenizer, path, max_tokens, f"eval domain {name} ({path})", RecipeError, _DOMAIN_FIX)


def score(model_dir: Path, windows: Mapping[str, torch.Tensor], opts: EvalOptions) -> dict[str, Scores]:
    """Negative log-likelihood and routing of every domain's ``windows`` under the model.

    One layer-streamed pass over all domains' chunks reads the weights once; each chunk's logits
    are reduced to their likelihood as soon as the head computes them.
    """
    config = load_config(model_dir)
    width = next(iter(windows.values())).shape[1]
    per_chunk = max(1, EVAL_LOGITS_CHUNK_BYTES // (width * config.vocab_size * 4))
    top_k = int(getattr(config, "num_experts_per_tok", 1))
    chunks = [(domain, chunk) for domain, ids in windows.items() for chunk in ids.split(per_chunk)]
    streamed = stream_logits(model_dir, [(chunk, torch.ones_like(chunk)) for _, chunk in chunks],
                             device=opts.device,
                             reduce=lambda b, logits: _nll(logits, chunks[b][1]))
    totals = {domain: Scores(nll=0.0, predicted=0) for domain in windows}
    for (domain, chunk), nll, routers in zip(chunks, streamed.logits, streamed.router_logits, strict=True):
        totals[domain].nll += nll
        totals[domain].predicted += chunk[:, 1:].numel()
        for router in routers:
            _count_routing(totals[domain], router, top_k)
    return totals


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed negative log-likelihood of every token after the first, in float64."""
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return float(-log_probs.gather(-1, ids[:, 1:, None]).sum())


def _count_routing(total: Scores, router: torch.Tensor, top_k: int) -> None:
    """Add one MoE layer's routing of the chunk's tokens to ``total``."""
    experts = router.shape[1]
    top1 = torch.bincount(router.argmax(-1), minlength=experts)
    slots = torch.bincount(router.topk(min(top_k, experts), dim=-1).indices.flatten(), minlength=experts)
    total.top1 = top1 if total.top1 is None else total.top1 + top1
    total.slots = slots if total.slots is None else total.slots + slots


def eval_windows(model_dir: Path, tokenizer_dir: Path, domains: Mapping[str, Path],
                 opts: EvalOptions) -> dict[str, torch.Tensor]:
    """Every domain's windows, tokenized by ``tokenizer_dir``'s tokenizer, once the device and the context are
    known to suit ``model_dir`` (the model about to be scored)."""
    require_device(opts.device, "eval.device")
    positions = load_config(model_dir).max_position_embeddings
    if opts.context > positions:
        raise RecipeError(f"context {opts.context} is longer than the model's {positions} positions", "eval.context",
                          f"use at most {positions}")
    tokenizer = load_tokenizer(tokenizer_dir, BuildError, "the tokenizer", "rerun the assemble step")
    return {name: domain_windows(domain_ids(tokenizer, name, Path(path), opts.max_tokens), tokenizer.bos_token_id,
                                 opts, f"eval domain {name} ({path})") for name, path in domains.items()}


def windows_digest(windows: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of every domain's windows: dense scores are used only for the windows they were taken on."""
    digest = hashlib.sha256()
    for name, ids in windows.items():
        digest.update(f"{name}:{list(ids.shape)}:".encode())
        digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def evaluate(moe_dir: Path, base_dir: Path, experts: Mapping[str, Path], domains: Mapping[str, Path],
             opts: EvalOptions) -> dict[str, Any]:
    """Per-domain perplexity of base, dense experts (in router row order), MoE and oracle; routing shares.

    A model directory named several times (an expert that is the base) is run once.
    """
    windows = eval_windows(moe_dir, moe_dir, domains, opts)
    models = {"base": Path(base_dir), **{name: Path(path) for name, path in experts.items()}, "moe": Path(moe_dir)}
    by_dir: dict[Path, dict[str, Scores]] = {}
    for directory in dict.fromkeys(models.values()):
        by_dir[directory] = score(directory, windows, opts)
    scores = {name: by_dir[directory] for name, directory in models.items()}
    return _report(scores, list(experts), windows, domains, opts)


def _report(scores: Mapping[str, Mapping[str, Scores]], experts: list[str], windows: Mapping[str, torch.Tensor],
            domains: Mapping[str, Path], opts: EvalOptions) -> dict[str, Any]:
    """The report: perplexities, oracle and ratio per domain, routing shares, what was measured."""
    perplexity = {model: {d: report_number(s.perplexity) for d, s in per_domain.items()}
                  for model, per_domain in scores.items()}
    oracle = {}
    for domain in windows:
        best = min(experts, key=lambda e: scores[e][domain].perplexity)
        oracle[domain] = {"expert": best, "perplexity": perplexity[best][domain],
                          "moe_ratio": report_number(scores["moe"][domain].perplexity
                                                     / scores[best][domain].perplexity)}
    return {
        "versions": {"moeforge": __version__, "torch": torch.__version__},
        "options": asdict(opts),
        "domains": {d: {"text": shown_path(domains[d]), "windows": int(ids.shape[0]),
                        "tokens_scored": int(ids[:, 1:].numel())} for d, ids in windows.items()},
        "experts": experts,
        "perplexity": perplexity,
        "oracle": oracle,
        "routing": {d: _routing_shares(scores["moe"][d], experts) for d in windows},
    }


def _routing_shares(scores: Scores, experts: list[str]) -> dict[str, Any] | None:
    """Each expert's share of a domain's tokens (top-1) and of its top-k slots, over every MoE layer."""
    if scores.top1 is None:
        return None
    if len(experts) != len(scores.top1):
        raise BuildError(f"the model has {len(scores.top1)} experts but {len(experts)} expert names were given",
                         "router", "the recipe and the built model disagree: rebuild")
    top1 = scores.top1.double() / scores.top1.sum()
    slots = scores.slots.double() / scores.slots.sum()
    return {"top1": {e: report_number(top1[i]) for i, e in enumerate(experts)},
            "slots": {e: report_number(slots[i]) for i, e in enumerate(experts)}}


def render_markdown(report: Mapping[str, Any]) -> str:
    """Perplexity table (models x domains, oracle and ratio last), then the routing table."""
    domains = list(report["domains"])
    lines = ["# Evaluation", "",
             f"Perplexity on held-out text, {report['options']['context']}-token windows "
             "(lower is better; oracle: the best dense expert on each domain).", "",
             "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for model, row in report["perplexity"].items():
        lines.append(f"| {model} | " + " | ".join(fmt(row[d]) for d in domains) + " |")
    lines.append("| oracle | " + " | ".join(f"{fmt(report['oracle'][d]['perplexity'])} "
                                          f"({report['oracle'][d]['expert']})" for d in domains) + " |")
    lines.append("| **moe / oracle** | " + " | ".join(f"**{fmt(report['oracle'][d]['moe_ratio'], '.3f')}**"
                                                    for d in domains) + " |")
    lines += ["", "| domain | tokens scored | text |", "|---|---|---|"]
    lines += [f"| {d} | {v['tokens_scored']} | `{v['text']}` |" for d, v in report["domains"].items()]
    if all(report["routing"].values()):
        experts = report["experts"]
        lines += ["", "Share of each domain's tokens whose first-choice expert is each expert (all MoE layers):",
                  "", "| domain | " + " | ".join(experts) + " |", "|---|" + "---|" * len(experts)]
        lines += [f"| {d} | " + " | ".join(fmt(r["top1"][e], ".2f") for e in experts) + " |"
                  for d, r in report["routing"].items()]
    return "\n".join(lines) + "\n"


_RESCORE_FIX = "delete it and rerun: the score_dense step writes it again"


def dense_stage(weight_record: Path, tokenizer_dir: Path, domains: Mapping[str, Path], opts: EvalOptions,
                out_json: Path) -> dict[str, Any]:
    """The score_dense rule: one dense model's summed log-likelihood on every domain's windows, tokenized by
    the merge base's tokenizer (the one the MoE carries), with the digest of those windows."""
    (model_dir,) = weight_dirs_from([weight_record]).values()
    windows = eval_windows(model_dir, tokenizer_dir, domains, opts)
    record = {"windows": windows_digest(windows),
              "scores": {d: {"nll": s.nll, "predicted": s.predicted} for d, s in score(model_dir, windows, opts).items()}}
    write_json(out_json, record)
    return record


def _dense_scores(path: Path, digest: str) -> dict[str, Scores]:
    """A dense model's scores from its score_dense record, which must be of these windows."""
    record = read_json(path, "dense scores", BuildError, _RESCORE_FIX)
    if record.get("windows") != digest:
        raise BuildError("scored on other windows than the merged model's", str(path), _RESCORE_FIX)
    return {d: Scores(nll=s["nll"], predicted=s["predicted"]) for d, s in record["scores"].items()}


def eval_stage(model_dir: Path, plan_json: Path, dense: Mapping[str, Path], domains: Mapping[str, Path],
               opts: EvalOptions, out_json: Path, out_md: Path, out_png: Path) -> dict[str, Any]:
    """The eval rule: the MoE scored here, its base and experts (by slug, from plan.json) read from their
    score_dense records; the report is the one ``evaluate`` gives."""
    from moeforge.check.plots import plot_evaluation  # here: the score_dense jobs draw nothing

    plan = read_plan(plan_json)
    windows = eval_windows(model_dir, model_dir, domains, opts)
    digest = windows_digest(windows)
    scores = {"base": _dense_scores(dense[plan.base], digest),
              **{e.name: _dense_scores(dense[e.slug], digest) for e in plan.experts},
              "moe": score(model_dir, windows, opts)}
    report = _report(scores, [e.name for e in plan.experts], windows, domains, opts)
    report["merge"] = plan.merge
    write_json(out_json, report)
    write_text(out_md, render_markdown(report))
    plot_evaluation(report, out_png)
    return report
