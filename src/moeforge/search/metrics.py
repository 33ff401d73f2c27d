"""What a search ranks by: numbers read from a candidate's evaluation report (check/evaluate.py).

Each metric is data (a name, what it means, how it is read); every one is lower-is-better, as
perplexity and the MoE/oracle ratio are. The default is the worst domain's MoE/oracle perplexity:
a merge is only as good as it is on the domain it routes worst.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import fmean
from typing import Any, Callable, Mapping

Report = Mapping[str, Any]


@dataclass(frozen=True)
class Metric:
    """One way to score a candidate from its eval report (lower is better)."""

    name: str
    description: str
    read: Callable[[Report], float]


def _finite(values: list[float | None]) -> list[float]:
    """The report writes a non-finite number as null: a candidate with one ranks after every finite one."""
    return [math.inf if v is None else v for v in values]


def _ratios(report: Report) -> list[float]:
    return _finite([entry["moe_ratio"] for entry in report["oracle"].values()])


def _moe_perplexities(report: Report) -> list[float]:
    return _finite(list(report["perplexity"]["moe"].values()))


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("worst_moe_ratio", "the worst domain's MoE / oracle perplexity", lambda r: max(_ratios(r))),
    Metric("mean_moe_ratio", "the mean over domains of MoE / oracle perplexity", lambda r: fmean(_ratios(r))),
    Metric("mean_moe_perplexity", "the mean over domains of the MoE's perplexity",
           lambda r: fmean(_moe_perplexities(r))),
)}
DEFAULT_METRIC = "worst_moe_ratio"
