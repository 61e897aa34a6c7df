"""Reading a manifest file (CSV or Parquet) into a table, however a spreadsheet saved it.

Only the file's shape is judged here (is it a file, its encoding, separator, header); what the rows
say is judged by batch_runner.inputs.validation.
"""

from __future__ import annotations

import csv
import errno
import os
import stat
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from batch_runner.columns import KNOWN_COLUMNS
from batch_runner.errors import UserError
from batch_runner.parquet import pandas_readable

MANIFEST_SUFFIXES = (".csv", ".parquet")


def read_table(path: Path) -> pd.DataFrame:
    """The manifest as a DataFrame, text columns as text, however a spreadsheet saved it."""
    what = not_a_file(path)
    if what:
        raise UserError(f"The manifest {str(path)!r} {what}; pass manifest=PATH to a .csv or .parquet file.")
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise UserError(
            f"The manifest {str(path)!r} is a {suffix or 'file without extension'}; "
            "save it as .csv (UTF-8) or .parquet."
        )
    # seed is read as text too: a column with a blank cell would otherwise pass through float64,
    # which rounds seeds above 2**53.
    text_columns = {c: str for c in ("id", "image", "prompt", "negative_prompt", "seed")}
    try:
        if suffix == ".parquet":
            return _read_parquet(path)
        # Spreadsheets in some locales save with ';' or tabs: the header line tells which, so
        # prompts with commas in them do not break the rows.
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = f.readline()
        sep = "," if "," in header else next((s for s in (";", "\t") if s in header), ",")
        _check_csv_shape(path, sep)
        return _read_csv(path, sep, text_columns)
    except UnicodeDecodeError as e:
        raise UserError(
            f"The manifest {str(path)!r} is not UTF-8 text (byte {e.start}); save it as 'CSV UTF-8'."
        ) from e
    except pd.errors.EmptyDataError as e:
        raise UserError(
            f"The manifest {str(path)!r} is empty; give it a header row (image,prompt) and a row per video."
        ) from e
    except (pd.errors.ParserError, OSError, ValueError) as e:
        first = str(e).strip().split(". ")[0].rstrip(".")  # pyarrow adds a second sentence of its own
        fix = "save it as Parquet, or name it .csv if it is CSV text" if suffix == ".parquet" else "save it as CSV"
        raise UserError(f"The manifest {str(path)!r} could not be read as {suffix[1:]} ({first}); {fix}.") from e


def not_a_file(path: Path) -> str | None:
    """Why `path` cannot be read as a file (None if it can), in words that say what it is."""
    text = str(path)
    if "://" in text:
        return "is a URL; download it and pass the local path (manifests and images are read from disk)"
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that points back to itself (a loop)"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)!r}, which does not exist"
        return "does not exist"
    if stat.S_ISDIR(mode):
        return "is a folder"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a pipe, socket or device)"
    return None


def _check_csv_shape(path: Path, sep: str) -> None:
    """Refuse a header that names a column twice and a row with more fields than the header, naming
    them (pandas would rename the second 'prompt' to 'prompt.1', or take extra fields for an index).
    A field may be of any length, as pandas reads it (the csv module stops at 131,072 characters)."""
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        header = [c.strip() for c in next(reader, [])]
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise UserError(
                f"The manifest {str(path)!r} names the column(s) {', '.join(map(repr, twice))} more than once in its "
                "header row; keep one of each."
            )
        for number, fields in enumerate(reader, 1):
            if len(fields) > len(header):
                raise UserError(
                    f"The manifest {str(path)!r} has {len(fields)} fields in row {number} but {len(header)} column "
                    f'names in its header; quote fields that hold {sep!r} ("a{sep} b"), or name every column.'
                )


def _read_parquet(path: Path) -> pd.DataFrame:
    """The columns batch_runner reads as NumPy-backed pandas; passthrough columns keep their Arrow
    type (pd.ArrowDtype), so they reach results.parquet and metadata.parquet as they were: a struct's
    int64 field or an int64 column with nulls would otherwise come back as double."""
    arrow = pq.read_table(path)
    names = [str(c).strip() for c in arrow.column_names]
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise UserError(
            f"The manifest {str(path)!r} has the column(s) {', '.join(map(repr, twice))} more than once; "
            "keep one of each."
        )
    table = pandas_readable(arrow).to_pandas()
    for name in arrow.column_names:
        if str(name).strip() == "seed" and pa.types.is_integer(arrow.column(name).type):
            # a seed column with a null (a previous run's results: its invalid rows) would pass through float64
            kind = pd.UInt64Dtype() if pa.types.is_unsigned_integer(arrow.column(name).type) else pd.Int64Dtype()
            table[name] = arrow.column(name).to_pandas(types_mapper={arrow.column(name).type: kind}.get)
        elif str(name).strip() not in KNOWN_COLUMNS:
            column = arrow.column(name).to_pandas(types_mapper=pd.ArrowDtype)
            column.index = table.index
            table[name] = column
    return table


def _read_csv(path: Path, sep: str, text_columns: dict[str, type]) -> pd.DataFrame:
    # utf-8-sig drops the BOM that spreadsheets write; only empty cells count as missing, so a
    # prompt that says "NA" stays a prompt.
    return pd.read_csv(path, sep=sep, encoding="utf-8-sig", dtype=text_columns, keep_default_na=False, na_values=[""])


def is_missing(value: Any) -> bool:
    """Whether a cell is empty: None, NaN, NA or NaT (a blank CSV cell reads as NaN)."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
