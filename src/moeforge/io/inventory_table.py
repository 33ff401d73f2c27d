"""Reading a source model's inventory.tsv, checked against its schema.

Apart from the writer (``inventory``), which fetch jobs import without pandas: only validation
reads the table, and it pays pandas' and pandera's import once for every source.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.pandas as pa

from moeforge.io.safetensors_file import ITEMSIZE, TensorEntry, shape_of

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


def read_inventory(tsv: Path) -> dict[str, TensorEntry]:
    """inventory.tsv as name -> entry."""
    frame = pd.read_csv(tsv, sep="\t", dtype={"shape": str}, keep_default_na=False)
    INVENTORY_SCHEMA.validate(frame)
    return {
        r.name: TensorEntry(r.name, r.dtype, shape_of(r.shape), int(r.begin), int(r.end), r.file)
        for r in frame.itertuples(index=False)
    }
