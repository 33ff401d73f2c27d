"""The tensor inventory of a source model, from safetensors headers only.

Validation decides everything it can from this table (names, dtypes, shapes, which file),
so it runs before a single weight byte is downloaded or read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pandera.pandas as pa

from moeforge.errors import ModelError
from moeforge.io.files import write_text
from moeforge.io.safetensors_file import (
    ITEMSIZE,
    TensorEntry,
    check_entries,
    parse_entries,
    read_header,
    shape_of,
)

COLUMNS = ["name", "dtype", "shape", "file", "begin", "end"]

INVENTORY_SCHEMA = pa.DataFrameSchema(
    {
        "name": pa.Column(str, unique=True, nullable=False),
        "dtype": pa.Column(str, pa.Check.isin(list(ITEMSIZE))),
        "shape": pa.Column(str, pa.Check.str_matches(r"^(\d+(,\d+)*)?$")),
        "file": pa.Column(str, pa.Check.str_length(min_value=1)),
        "begin": pa.Column(int, pa.Check.ge(0)),
        "end": pa.Column(int, pa.Check.ge(0)),
    },
    checks=[pa.Check(lambda df: df["end"] >= df["begin"], error="end before begin")],
    strict=True,
    ordered=True,
)




def _rows_from_headers(headers: Mapping[str, Mapping[str, Any]], ref: str) -> list[dict[str, Any]]:
    """Inventory rows, each file's header checked as ``read_header`` checks a local one.

    Hub headers come from range requests, without the file, so the data buffer's length is not
    known here; the end-of-buffer check runs on the downloaded files (``fetch_weights``).
    """
    rows = []
    for file, header in sorted(headers.items()):
        entries = parse_entries(header, f"{ref}: {file}")
        check_entries(entries, None, f"{ref}: {file}")
        rows.extend({"name": e.name, "dtype": e.dtype, "shape": ",".join(map(str, e.shape)), "file": file,
                     "begin": e.begin, "end": e.end} for e in entries.values())
    return rows


def local_headers(directory: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    headers = {}
    for file in files:
        _, entries = read_header(directory / file)
        headers[file] = {e.name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
                         for e in entries.values()}
    return headers


def write_inventory(source: Mapping[str, Any], headers: Mapping[str, Any] | None, out_tsv: Path) -> pd.DataFrame:
    """Build, validate and write inventory.tsv for a fetched source."""
    if headers is None:
        headers = local_headers(Path(source["local_path"]), source["weight_files"])
    frame = pd.DataFrame(_rows_from_headers(headers, source["ref"]), columns=COLUMNS)
    if frame["name"].duplicated().any():
        dup = frame.loc[frame["name"].duplicated(), "name"].iloc[0]
        raise ModelError(f"tensor {dup!r} appears in more than one weight file", source["ref"],
                         "the checkpoint is inconsistent; re-download it")
    frame = frame.astype({"begin": int, "end": int})
    INVENTORY_SCHEMA.validate(frame)
    write_text(out_tsv, frame.to_csv(sep="\t", index=False))
    return frame


def read_inventory(tsv: Path) -> dict[str, TensorEntry]:
    """inventory.tsv as name -> entry."""
    frame = pd.read_csv(tsv, sep="\t", dtype={"shape": str}, keep_default_na=False)
    INVENTORY_SCHEMA.validate(frame)
    return {
        r.name: TensorEntry(r.name, r.dtype, shape_of(r.shape), int(r.begin), int(r.end), r.file)
        for r in frame.itertuples(index=False)
    }
