"""Files that appear complete or not at all.

Everything the runner publishes (videos, tables, shards, reports) is written to a hidden temporary
name in the same folder, flushed to disk, then renamed over the final name: a reader, a resumed run
or a crash never sees half a file. Leftover temporaries carry TEMP_SUFFIX and are swept at start.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

TEMP_SUFFIX = ".partial"


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `final`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(data: bytes, final: Path) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(text: str, final: Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), final)


def atomic_write_parquet(table: pd.DataFrame, final: Path) -> None:
    with atomic_path(final) as tmp:
        table.to_parquet(tmp, index=False)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep_temporaries(root: Path) -> int:
    """Delete temporaries left by killed processes under `root`; returns how many."""
    count = 0
    for leftover in root.rglob(f".*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        count += 1
    return count
