"""Shard keys: a shard file is named after what it holds, not after the merge that asked for it.

A shard that reads the source models (the globals, a run of decoder layers) holds exactly what its plan
rows say, read from sources whose bytes are known by their content id (``moeforge.io.fetch.content_id``: a
Hub commit, a local model's file hashes). Its key hashes those rows with each source named by its content
id, so merges and search candidates that need the same shard (merges that differ only in gate mode or
experts per token need every one of them) share one job and one file, and a changed source or a changed
row gives a new key: an old file is never taken for a new one. The routers shard reads the merge's own gates and stays the merge's.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from typing import Mapping

from moeforge.plan.table import (
    GATES_SOURCE,
    PLAN_COLUMNS,
    ROUTERS_SHARD,
    ZEROS_SOURCE,
    parse_scale_ref,
    scale_ref,
)

#: A shard key: the shard's name, then 16 hex digits of the hash (64 bits: no collision among the shards of
#: any set of merges).
KEY_PATTERN = r"(?:globals|layers-\d+-\d+)-[0-9a-f]{16}"
#: Part of every hash, so that a change in how shards are written can give every shard a new key.
_KEY_FORMAT = "moeforge shard 1"


def shard_keys(table: str, content_ids: Mapping[str, str]) -> dict[str, str]:
    """The key of every shard that reads the sources, from plan.tensors.tsv's text (the bytes the shard jobs
    read) with each source slug replaced by its content id: a model reached by another path or name holds the
    same bytes, so its shards are the same files."""
    rows: dict[str, list[list[str]]] = {}
    for row in csv.DictReader(io.StringIO(table), delimiter="\t"):
        if row["shard"] == ROUTERS_SHARD:
            continue
        row["source"] = content_ids.get(row["source"], row["source"])  # zeros stay zeros
        ref = parse_scale_ref(row["scale_ref"])
        if ref is not None:
            row["scale_ref"] = scale_ref(content_ids[ref[0]], *ref[1:])
        rows.setdefault(row["shard"], []).append([row[column] for column in PLAN_COLUMNS])
    keys = {}
    for shard, shard_rows in rows.items():
        content = {"format": _KEY_FORMAT, "columns": PLAN_COLUMNS, "rows": shard_rows}
        digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()
        keys[shard] = f"{shard}-{digest[:16]}"
    return keys


def shard_of_key(key: str) -> str:
    """The shard name a key starts with (``layers-0-3`` of ``layers-0-3-<hash>``)."""
    return key.rsplit("-", 1)[0]


def sources_read(rows: list[dict[str, str]]) -> list[str]:
    """The source slugs a shard's rows read, the base named by an expert row's scale check included."""
    slugs = {row["source"] for row in rows if row["source"] not in (ZEROS_SOURCE, GATES_SOURCE)}
    slugs |= {ref[0] for row in rows if (ref := parse_scale_ref(row["scale_ref"])) is not None}
    return sorted(slugs)
