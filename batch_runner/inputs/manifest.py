"""Reading a CSV or Parquet manifest into validated jobs.

Validation runs before any model loads and reports every bad row at once, naming the row, its id,
the column and the fix, so that a run over thousands of rows is never stopped halfway by row 2,000.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import math
import numbers
import os
import re
import stat
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from batch_runner.config import ModelConfig
from batch_runner.errors import UserError
from batch_runner.families import family_of

REQUIRED_COLUMNS = ("image", "prompt")
OVERRIDE_COLUMNS = (
    "last_image",
    "seed",
    "negative_prompt",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "fps",
)
KNOWN_COLUMNS = ("id", *REQUIRED_COLUMNS, *OVERRIDE_COLUMNS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_SUFFIXES = (".csv", ".parquet")
MAX_SEED = 2**63 - 1
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


@dataclass(frozen=True)
class Job:
    """One row, with every default filled in: all a replica needs to make one video."""

    index: int  # position in the manifest, from 0
    id: str
    image: str  # absolute path
    prompt: str
    negative_prompt: str
    seed: int
    num_frames: int
    height: int
    width: int
    fps: float
    num_inference_steps: int
    guidance_scale: float
    last_image: str | None = None  # absolute path of the last frame, for models that take one

    @property
    def row(self) -> int:
        """The row number people see: the first data row is row 1."""
        return self.index + 1

    def params_hash(self, salt: str = "") -> str:
        """Fingerprint of everything that decides this row's video.

        A finished row is reused on resume only while this stays the same, so editing a prompt or a
        seed in the manifest regenerates exactly the rows that changed.
        """
        fields = asdict(self)
        fields.pop("index")
        for name in ("image", "last_image"):
            path = Path(getattr(self, name)) if getattr(self, name) else None
            stat = path.stat() if path and path.exists() else None
            fields[f"{name}_stat"] = (stat.st_size, stat.st_mtime_ns) if stat else None
        if self.last_image is None:  # rows without one keep the fingerprint they had before last_image
            del fields["last_image"], fields["last_image_stat"]
        blob = repr(sorted(fields.items())) + salt
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RowProblem:
    row: int
    id: str | None
    column: str
    reason: str

    def __str__(self) -> str:
        who = f"row {self.row}" + (f" (id {self.id!r})" if self.id is not None else "")
        return f"{who}, column '{self.column}': {self.reason}."


@dataclass
class Manifest:
    path: Path
    table: pd.DataFrame  # the rows this run makes (all, or those `ids=` selected), with `id` filled in
    jobs: list[Job]  # the valid rows of `table`, in manifest order
    problems: list[RowProblem]  # of the rows of `table`
    passthrough: list[str]  # columns carried unchanged into the results
    # Every row of the manifest, also those `ids=` left out: results.parquet, metadata.parquet and the
    # report keep their earlier rows, so regenerating one video never shrinks the dataset. None: `table`.
    all_rows: pd.DataFrame | None = None
    # What was done to the manifest's columns up front (runner columns renamed or dropped), to tell the user.
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> pd.DataFrame:
        return self.table if self.all_rows is None else self.all_rows

    @property
    def record_ids(self) -> pd.Series:
        """Each row's id as results record it: a blank id cell becomes the row-number id. Made over
        every row, so that a selected row's record id is the one it has in the whole manifest."""
        return self.all_record_ids[self.table.index]

    @property
    def all_record_ids(self) -> pd.Series:
        """record_ids over every row of the manifest, selected by `ids=` or not."""
        return record_ids(self.rows)

    @property
    def invalid_ids(self) -> dict[str, str]:
        """Record id -> every reason its row was refused, for rows recorded as failed under on_invalid=skip."""
        record_ids = self.record_ids
        reasons: dict[str, list[str]] = {}
        for p in self.problems:
            reasons.setdefault(record_ids[p.row - 1], []).append(f"column '{p.column}': {p.reason}")
        return {k: "; ".join(v) for k, v in reasons.items()}


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


def default_id(index: int) -> str:
    """A stable id from the row number, for manifests without an id column."""
    return f"row{index + 1:06d}"


def derive_seed(base_seed: int, row_id: str) -> int:
    """A row's seed from the base seed and its id: the same however many processes share the run."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def read_table(path: Path) -> pd.DataFrame:
    """The manifest as a DataFrame, text columns as text, however a spreadsheet saved it."""
    what = _not_a_file(path)
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
    except (pd.errors.ParserError, OSError, ValueError) as e:
        raise UserError(f"The manifest {str(path)!r} could not be read as {suffix[1:]}: {e}") from e


def _not_a_file(path: Path) -> str | None:
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
    them (pandas would rename the second 'prompt' to 'prompt.1', or take extra fields for an index)."""
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
    table = arrow.to_pandas()
    for name in arrow.column_names:
        if str(name).strip() == "seed" and pa.types.is_integer(arrow.column(name).type):
            # a seed column with a null (a previous run's results: its invalid rows) would pass through float64
            table[name] = arrow.column(name).to_pandas(types_mapper={arrow.column(name).type: pd.Int64Dtype()}.get)
        elif str(name).strip() not in KNOWN_COLUMNS:
            column = arrow.column(name).to_pandas(types_mapper=pd.ArrowDtype)
            column.index = table.index
            table[name] = column
    return table


def _read_csv(path: Path, sep: str, text_columns: dict[str, type]) -> pd.DataFrame:
    # utf-8-sig drops the BOM that spreadsheets write; only empty cells count as missing, so a
    # prompt that says "NA" stays a prompt.
    return pd.read_csv(path, sep=sep, encoding="utf-8-sig", dtype=text_columns, keep_default_na=False, na_values=[""])


def load_manifest(
    path: str | Path,
    model: ModelConfig,
    base_seed: int,
    ids: list[str] | None = None,
    output_format: str = "videofolder",
) -> Manifest:
    """Read and validate the manifest; problems are collected, not raised, so all are reported.

    Every row is validated (ids must be unique across the whole manifest), but with `ids` only the
    selected rows become jobs and only their problems are reported.
    """
    if "://" in str(path):
        raise UserError(
            f"The manifest {str(path)!r} is a URL; download it and pass the local path (manifests are read from disk)."
        )
    try:
        path = Path(path).expanduser().resolve()
    except (RuntimeError, OSError):  # a symbolic link loop (Python < 3.13 raises RuntimeError)
        path = Path(path).expanduser().absolute()
    table = read_table(path)
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        found = ", ".join(map(repr, table.columns)) or "none"
        raise UserError(
            f"The manifest {str(path)!r} lacks the required column(s) {', '.join(map(repr, missing))} "
            f"(found {found}); add them to its header row."
        )
    table = table.reset_index(drop=True)
    table, notes = _own_columns(path, table)
    if "id" in table.columns:
        table["id"] = [_as_id(v, i) for i, v in enumerate(table["id"])]
    else:
        table.insert(0, "id", [default_id(i) for i in range(len(table))])

    _check_columns(path, table, output_format)
    selected = table
    if ids is not None:
        unknown = sorted(set(ids) - set(table["id"]))
        if unknown:
            raise UserError(f"ids={unknown} are not in the manifest {str(path)!r}; check the spelling.")
        selected = table[table["id"].isin(set(ids))]

    problems: list[RowProblem] = []
    jobs: list[Job] = []
    seen = _SeenIds(webdataset=output_format == "webdataset")
    for index, record in zip(table.index, table.to_dict("records"), strict=False):
        row_problems, job = _validate_row(index, record, path.parent, model, base_seed, seen)
        if index not in selected.index:
            continue
        problems.extend(row_problems)
        if job is not None and not row_problems:
            jobs.append(job)
    passthrough = [c for c in table.columns if c not in KNOWN_COLUMNS]
    return Manifest(
        path=path,
        table=selected,
        jobs=jobs,
        problems=problems,
        passthrough=passthrough,
        all_rows=None if ids is None else table,
        notes=notes,
    )


# Columns the runner writes itself into results.parquet and metadata.parquet, besides the row inputs
# (KNOWN_COLUMNS): a manifest column of one of these names would be a second column of that name there.
# tests/test_hardening_columns.py checks that this list follows the results' own columns.
RUNNER_COLUMNS = (
    "status",
    "video_path",
    "rank",
    "seconds",
    "peak_memory_gib",
    "error",
    "warnings",
    "memory_plan",
    "params_hash",
    "finished_at",
    "motion",
    "brightness",
    "model",
    "model_path",
    "model_revision",
    "scheduler",
    "dtype",
    "torch_version",
    "diffusers_version",
    "transformers_version",
    "batch_runner_version",
    "gpu",
    "gpus_per_replica",
    "vae_tile",
    "loras",
    "config_hash",
    "text_encode_seconds",
    "image_encode_seconds",
    "denoise_seconds",
    "decode_seconds",
    "write_seconds",
    "writer_wait_seconds",
    "has_audio",
    "audio_sample_rate",
    "file_name",
)
# A table holding all of these is a previous run's results.parquet.
_RESULTS_SIGNATURE = ("status", "params_hash", "finished_at")
RENAMED_PREFIX = "manifest_"


def _own_columns(path: Path, table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The manifest with no column named like one the runner writes, decided before anything runs.

    The rule: a previous run's results.parquet (it has status, params_hash and finished_at) is a
    manifest of its row inputs; its runner columns are dropped. In any other manifest a column named
    like a runner column is kept as `manifest_<name>`. Both are said in a note; a clash of the new
    name with another column is refused.
    """
    clashing = [c for c in table.columns if c in RUNNER_COLUMNS]
    if not clashing:
        return table, []
    if all(c in table.columns for c in _RESULTS_SIGNATURE):
        return table.drop(columns=clashing), [
            f"The manifest {str(path)!r} is a previous run's results table: its runner columns "
            f"({', '.join(clashing)}) are dropped, and each row is made from its inputs (id, image, prompt, seed, ...)."
        ]
    renamed = {c: f"{RENAMED_PREFIX}{c}" for c in clashing}
    taken = [new for new in renamed.values() if new in table.columns]
    if taken:
        raise UserError(
            f"The manifest {str(path)!r} has a column {taken[0].removeprefix(RENAMED_PREFIX)!r}, a name the runner "
            f"writes itself, and a column {taken[0]!r} as well; rename one of them."
        )
    listed = ", ".join(f"{old!r} -> {new!r}" for old, new in renamed.items())
    return table.rename(columns=renamed), [
        f"The manifest {str(path)!r} has column(s) named like the runner's own; they are carried as {listed}."
    ]


def _check_columns(path: Path, table: pd.DataFrame, output_format: str) -> None:
    """Columns the outputs cannot carry: refused before anything loads, naming the column."""
    if output_format != "webdataset":
        return
    for column in table.columns:
        if any(isinstance(v, (list, tuple, dict, np.ndarray)) for v in table[column]):
            raise UserError(
                f"The manifest {str(path)!r} has list or struct values in column {column!r}, which "
                "output.format=webdataset cannot put in a sample's JSON; flatten the column to text "
                "or numbers, or use output.format=videofolder."
            )


class _SeenIds:
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


def _as_id(value: Any, index: int) -> str:
    if _is_missing(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _validate_row(
    index: int,
    record: dict[str, Any],
    base_dir: Path,
    model: ModelConfig,
    base_seed: int,
    seen: _SeenIds,
) -> tuple[list[RowProblem], Job | None]:
    row_id = record["id"]
    problems: list[RowProblem] = []

    def problem(column: str, reason: str) -> None:
        problems.append(RowProblem(index + 1, row_id or None, column, reason))

    id_reason = id_problem(row_id) or seen.clash(row_id, index + 1)
    if id_reason:
        problem("id", id_reason)

    prompt = record.get("prompt")
    if _is_missing(prompt) or not str(prompt).strip():
        problem("prompt", "the prompt is empty; write what the video should show")
    image_path = _check_image(record.get("image"), base_dir, problem)

    negative = record.get("negative_prompt")
    negative = model.negative_prompt if _is_missing(negative) else str(negative)

    seed = _integer(record, "seed", None, 0, MAX_SEED, problem)
    frames = _integer(record, "num_frames", model.num_frames, 1, 10_000, problem)
    steps = _integer(record, "num_inference_steps", model.num_inference_steps, 1, 1000, problem)
    height = _integer(record, "height", model.height, 8, 8192, problem)
    width = _integer(record, "width", model.width, 8, 8192, problem)
    guidance = _number(record, "guidance_scale", model.guidance_scale, 0.0, 100.0, problem)
    fps = _number(record, "fps", model.fps, 0.1, 240.0, problem)

    for column, reason in family_of(model).row_problems(model, frames, height, width):
        problem(column, reason)
    last_image = None
    if not _is_missing(record.get("last_image")) and str(record.get("last_image")).strip():
        if family_of(model).takes_last_image(model):
            last_image = _check_image(record.get("last_image"), base_dir, problem, column="last_image")
        else:
            problem("last_image", f"{model.name} makes videos from a first frame only; leave last_image empty")

    if problems or image_path is None:
        return problems, None
    return problems, Job(
        index=index,
        id=row_id,
        image=str(image_path),
        last_image=str(last_image) if last_image else None,
        prompt=str(prompt).strip(),
        negative_prompt=negative,
        seed=derive_seed(base_seed, row_id) if seed is None else seed,
        num_frames=frames,
        height=height,
        width=width,
        fps=fps,
        num_inference_steps=steps,
        guidance_scale=guidance,
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


def _check_image(value: Any, base_dir: Path, problem: Any, column: str = "image") -> Path | None:
    if _is_missing(value) or not str(value).strip():
        problem(column, "no image path; give a path relative to the manifest's folder or an absolute one")
        return None
    raw = str(value).strip()
    if "://" in raw:
        problem(column, f"{raw!r} is a URL; download the image and give its path on disk")
        return None
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        problem(column, f"{raw!r} is a folder (looked at {str(path)!r}); give the path of an image file in it")
        return None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        problem(
            column,
            f"{raw!r} is not a supported image type ({', '.join(IMAGE_SUFFIXES)}); convert it to PNG or JPEG",
        )
        return None
    what = _not_a_file(path)
    if what == "does not exist":
        problem(
            column,
            f"{raw!r} does not exist (looked for {str(path)!r}); relative paths are read from the manifest's folder",
        )
        return None
    if what:
        problem(column, f"{raw!r} {what} (looked at {str(path)!r}); give the path of an image file")
        return None
    return path.resolve()


def _integer(record: dict, column: str, default: int | None, lo: int, hi: int, problem: Any) -> int | None:
    value = record.get(column)
    if _is_missing(value):
        return default
    try:
        number = _as_integer(value)
    except (ValueError, OverflowError):
        problem(column, f"{value!r} is not a whole number; write an integer from {lo} to {hi}")
        return None
    if not lo <= number <= hi:
        problem(column, f"{number} is out of range; use an integer from {lo} to {hi}")
        return None
    return number


def _as_integer(value: Any) -> int:
    """int(value) for whole numbers however they were stored ("12", "12.0", 12.0, numpy ints)."""
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        if not float(value).is_integer():
            raise ValueError(value)
        return int(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        as_float = float(text)
        if not as_float.is_integer():
            raise ValueError(value) from None
        return int(as_float)


def _number(record: dict, column: str, default: float, lo: float, hi: float, problem: Any) -> float | None:
    value = record.get(column)
    if _is_missing(value):
        return default
    try:
        number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        problem(column, f"{value!r} is not a number; write a number from {lo:g} to {hi:g}")
        return None
    if not (math.isfinite(number) and lo <= number <= hi):
        problem(column, f"{value!r} is out of range; use a number from {lo:g} to {hi:g}")
        return None
    return number


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
