"""plan.tensors.tsv, the contract between validation and the shard jobs: columns and reading.

No pandas here: shard jobs read their rows with the csv module and start in a fraction of a
second; validation builds and checks the table with pandera in ``moeforge.plan.rows``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Mapping

from moeforge.io.safetensors_file import shape_of

PLAN_COLUMNS = ["target_name", "part", "concat_dim", "shard", "source", "source_name", "source_file", "dtype_in",
                "dtype_out", "shape", "transform", "scale_ref"]

#: ``scale_ref`` of an expert row: the base model's counterpart of its source tensor, as
#: ``slug/file/tensor name`` (slugs and weight file names hold no "/"), whose scale the shard job compares
#: with the expert's; empty on every other row.
SCALE_REF_SEPARATOR = "/"


def scale_ref(slug: str, file: str, name: str) -> str:
    """The ``scale_ref`` value naming tensor ``name`` in ``file`` of the source model ``slug``."""
    return SCALE_REF_SEPARATOR.join((slug, file, name))


def parse_scale_ref(value: str) -> tuple[str, str, str] | None:
    """(slug, file, tensor name) of a ``scale_ref`` value; None for an empty one."""
    if not value:
        return None
    slug, file, name = value.split(SCALE_REF_SEPARATOR, 2)
    return slug, file, name


ZEROS_SOURCE = "zeros"


GATES_SOURCE = "gates"
#: The file gates rows read: the gates step's routers, or, when the recipe trains them, the trained ones (the
#: same tensor names; see moeforge.train). The plan records which; the routers shard job is given the file
#: itself (the gates are named by their key, results/gates/<key>.safetensors).
GATES_FILE = "gates.safetensors"
TRAINED_ROUTERS_FILE = "trained.safetensors"


def routers_file(trained: bool) -> str:
    """The file name the gates rows of a plan read."""
    return TRAINED_ROUTERS_FILE if trained else GATES_FILE


#: The shard of every router (and shared-expert gate) matrix: the only rows that read gates.safetensors,
#: so the layer shards do not wait for the gate computation.
ROUTERS_SHARD = "routers"


def tensor_shape(parts: list[Mapping[str, Any]]) -> tuple[int, ...]:
    """An output tensor's shape from its plan rows: parts concatenated along their concat_dim."""
    shapes = [shape_of(p["shape"]) for p in parts]
    dim = int(parts[0]["concat_dim"])
    out = list(shapes[0])
    out[dim] = sum(s[dim] for s in shapes)
    return tuple(out)


def read_rows(plan_tsv: Path, shard: str | None = None) -> list[dict[str, str]]:
    """The rows of plan.tensors.tsv (of one shard, or all), in plan order."""
    with open(plan_tsv, newline="") as fh:
        return [row for row in csv.DictReader(fh, delimiter="\t") if shard is None or row["shard"] == shard]


def planned_shapes(rows: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, ...]]:
    """Output tensor name -> shape, with multi-part tensors concatenated along their dim."""
    parts: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        parts.setdefault(row["target_name"], []).append(row)
    return {name: tensor_shape(sorted(group, key=lambda r: int(r["part"]))) for name, group in parts.items()}
