"""Row ids: how a row is named, which names are refused, and the ids and seeds derived from them.

An id names the row's video file and its record in the results, so it must be a portable file name
and unique however a file system or WebDataset folds it.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import pandas as pd

from batch_runner.inputs.reading import is_missing

MAX_ID_BYTES = 200
# Names Windows refuses as files, with or without an extension; ids name video files.
_RESERVED_NAMES = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(10)),
    *(f"lpt{i}" for i in range(10)),
}
_UNSAFE_ID_CHARS = re.compile(r'[/\\:*?"<>|]')
# Unicode categories refused in ids: controls (Cc), format characters (Cf: bidi overrides such as
# U+202E, zero-width spaces and joiners, BOMs), line/paragraph separators, private use, surrogates and
# unassigned code points. They hide what a file name is, or reorder how it is shown.
_UNSAFE_ID_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})
# What id_problem refuses, in the words of its refusals; the rule and this text are tested together.
ID_RULE = (
    'ids name the video files, so use letters, digits, spaces and punctuation except / \\ : * ? " < > |, '
    "with no control, bidi or zero-width characters, not starting with '.' or '~' nor ending with '.' or a space"
)


def id_problem(row_id: str) -> str | None:
    """Why `row_id` cannot name a file inside output_dir, or None if it can."""
    fix = ID_RULE
    if not row_id:
        return f"the id is empty; {fix}"
    if _UNSAFE_ID_CHARS.search(row_id) or row_id in (".", "..") or row_id.startswith("~"):
        return f"{row_id!r} could write outside output_dir or is not a portable file name; {fix}"
    hidden = sorted({f"U+{ord(c):04X}" for c in row_id if unicodedata.category(c) in _UNSAFE_ID_CATEGORIES})
    if hidden:
        return (
            f"{row_id!r} holds {', '.join(hidden)} (control, bidi or zero-width), which is not a portable "
            f"file name; {fix}"
        )
    if row_id.startswith("."):
        return f"{row_id!r} would be a hidden file; {fix}"
    if row_id.endswith((".", " ")) or row_id != row_id.strip():
        return f"{row_id!r} starts or ends with a space or ends with '.'; {fix}"
    if row_id.split(".")[0].lower() in _RESERVED_NAMES:
        return f"{row_id!r} is a file name Windows reserves; rename it"
    if len(row_id.encode()) > MAX_ID_BYTES:
        return f"the id is {len(row_id.encode())} bytes long; keep it under {MAX_ID_BYTES}"
    return None


class SeenIds:
    """The ids of earlier rows, to refuse an id that would name the same file as another's.

    Exact duplicates, ids equal once Unicode-normalised (NFC and NFD 'ü'), ids that differ only by
    case (one file on macOS and Windows file systems)
    and, for WebDataset, ids that map to the same sample key ('a.b' and 'a_b').
    """

    def __init__(self, webdataset: bool) -> None:
        self.webdataset = webdataset
        self.exact: dict[str, int] = {}
        self.normal: dict[str, tuple[str, int]] = {}
        self.folded: dict[str, tuple[str, int]] = {}
        self.keys: dict[str, tuple[str, int]] = {}

    def clash(self, row_id: str, row: int) -> str | None:
        """Why `row_id` clashes with an earlier row's id (None if not); remembers it otherwise."""
        if row_id in self.exact:
            return f"duplicate id, also used by row {self.exact[row_id]}; ids must be unique"
        normal = unicodedata.normalize("NFC", row_id)
        if normal in self.normal:
            other, first = self.normal[normal]
            return (
                f"is row {first}'s id {other!r} written with other Unicode code points (NFC normalisation makes "
                "them equal), so their videos would be one file on macOS; make the ids differ"
            )
        folded = normal.casefold()
        if folded in self.folded:
            other, first = self.folded[folded]
            return (
                f"differs from row {first}'s id {other!r} only by case, so their videos would be one file "
                "on macOS and Windows; make the ids differ by more than case"
            )
        key = sample_key(row_id)
        if self.webdataset and key in self.keys:
            other, first = self.keys[key]
            return (
                f"maps to the same WebDataset key {key!r} as row {first}'s id {other!r} ('.' becomes '_'); "
                "rename one of them"
            )
        self.exact[row_id] = row
        self.normal[normal] = (row_id, row)
        self.folded[folded] = (row_id, row)
        self.keys[key] = (row_id, row)
        return None


def as_id(value: Any, index: int) -> str:
    """A cell of the id column as text: blank stays blank, 12.0 (a spreadsheet's number) is '12'."""
    if is_missing(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def default_id(index: int) -> str:
    """A stable id from the row number, for manifests without an id column."""
    return f"row{index + 1:06d}"


def record_ids(table: pd.DataFrame) -> pd.Series:
    """Each row's id as results record it: a blank id cell, or a later repeat of an id already used
    (refused as a duplicate), becomes the row-number id, so every row has a record.

    A row-number id that a row uses as its real id ('row000002') gets a suffix ('row000002-2'), so a
    fallback never replaces a real row's record.
    """
    ids = table["id"]
    repeated = ids.duplicated(keep="first") & (ids != "")
    taken = set(ids[~repeated & (ids != "")])
    record = []
    for i, row_id, again in zip(ids.index, ids, repeated, strict=True):
        if row_id and not again:
            record.append(row_id)
            continue
        fallback, n = default_id(i), 1
        while fallback in taken:
            n += 1
            fallback = f"{default_id(i)}-{n}"
        taken.add(fallback)
        record.append(fallback)
    return pd.Series(record, index=ids.index)


def sample_key(row_id: str) -> str:
    """WebDataset splits names at the first dot, so the key is the id with dots made underscores."""
    return row_id.replace(".", "_")


def derive_seed(base_seed: int, row_id: str) -> int:
    """A row's seed from the base seed and its id: the same however many processes share the run."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
