"""The tensor inventory of a source model, from safetensors headers only.

Validation decides everything it can from this table (names, dtypes, shapes, which file),
so it runs before a single weight byte is downloaded or read.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping

from moeforge.errors import ModelError
from moeforge.io.files import write_text
from moeforge.io.safetensors_file import check_entries, parse_entries, read_header

COLUMNS = ["name", "dtype", "shape", "file", "begin", "end"]


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


def write_inventory(source: Mapping[str, Any], headers: Mapping[str, Any] | None, out_tsv: Path) -> None:
    """Build and write inventory.tsv for a fetched source.

    The rows are checked here as safetensors headers (``check_entries``) and once more against
    the table's schema by its reader (``inventory_table``); written with the csv module, so a
    fetch job does not pay pandas' and pandera's import for a table it only writes.
    """
    if headers is None:
        headers = local_headers(Path(source["local_path"]), source["weight_files"])
    rows = _rows_from_headers(headers, source["ref"])
    seen: set[str] = set()
    for row in rows:
        if row["name"] in seen:
            raise ModelError(f"tensor {row['name']!r} appears in more than one weight file", source["ref"],
                             "the checkpoint is inconsistent; re-download it")
        seen.add(row["name"])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_tsv, text.getvalue())
