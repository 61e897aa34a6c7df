"""Parquet files that pandas reads back: the manifests batch_runner reads and the tables it writes.

pandas 3.1 records a column of an Arrow nested type (`pd.ArrowDtype` of a list or struct: a
manifest's passthrough column) in the file's pandas metadata by a dtype name it cannot parse back
("list<element: string>[pyarrow]"), so `pd.read_parquet` of such a file raises TypeError, and so
did a run given its own earlier `results.parquet` as its manifest. Such a column is recorded as an
object column instead: pandas reads it back as lists and dicts, and Arrow readers (pyarrow, Hugging
Face datasets) still see its Arrow type, which the metadata does not change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def pandas_readable(table: pa.Table) -> pa.Table:
    """`table` with every column its pandas metadata names by an unreadable dtype recorded as object."""
    metadata = table.schema.metadata or {}
    if b"pandas" not in metadata:
        return table
    described = json.loads(metadata[b"pandas"])
    unreadable = [column for column in described.get("columns", []) if not _readable(column.get("numpy_type"))]
    if not unreadable:
        return table
    for column in unreadable:
        column["numpy_type"] = "object"
    return table.replace_schema_metadata(metadata | {b"pandas": json.dumps(described).encode()})


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """`frame.to_parquet(path, index=False)`, readable by `pd.read_parquet` whatever its columns hold."""
    pq.write_table(pandas_readable(pa.Table.from_pandas(frame, preserve_index=False)), path)


def _readable(dtype: str | None) -> bool:
    if dtype is None:
        return True
    try:
        pd.api.types.pandas_dtype(dtype)
    except TypeError:
        return False
    return True
