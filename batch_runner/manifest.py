"""Reading a CSV or Parquet manifest into validated jobs.

Validation runs before any model loads and reports every bad row at once, naming the row, its id,
the column and the fix, so that a run over thousands of rows is never stopped halfway by row 2,000.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from batch_runner.config import ModelConfig
from batch_runner.errors import UserError
from batch_runner.rules import frame_problem, size_problem

REQUIRED_COLUMNS = ("image", "prompt")
OVERRIDE_COLUMNS = (
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
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
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
_UNSAFE_ID_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')


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
        image = Path(self.image)
        stat = image.stat() if image.exists() else None
        fields["image_stat"] = (stat.st_size, stat.st_mtime_ns) if stat else None
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
    table: pd.DataFrame  # the rows as read, with an `id` column filled in
    jobs: list[Job]  # the valid rows, in manifest order
    problems: list[RowProblem]
    passthrough: list[str]  # columns carried unchanged into the results

    @property
    def record_ids(self) -> pd.Series:
        """Each row's id as results record it: a blank id cell, or a later repeat of an id already
        used (refused as a duplicate), becomes the row-number id, so every row has a record."""
        ids = self.table["id"]
        repeated = ids.duplicated(keep="first") & (ids != "")
        rows = zip(ids.index, ids, repeated, strict=True)
        record = [default_id(i) if not row_id or again else row_id for i, row_id, again in rows]
        return pd.Series(record, index=ids.index)

    @property
    def invalid_ids(self) -> dict[str, str]:
        """Record id -> every reason its row was refused, for rows recorded as failed under on_invalid=skip."""
        record_ids = self.record_ids
        reasons: dict[str, list[str]] = {}
        for p in self.problems:
            reasons.setdefault(record_ids[p.row - 1], []).append(f"column '{p.column}': {p.reason}")
        return {k: "; ".join(v) for k, v in reasons.items()}


def default_id(index: int) -> str:
    """A stable id from the row number, for manifests without an id column."""
    return f"row{index + 1:06d}"


def derive_seed(base_seed: int, row_id: str) -> int:
    """A row's seed from the base seed and its id: the same however many processes share the run."""
    digest = hashlib.sha256(f"{base_seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def read_table(path: Path) -> pd.DataFrame:
    """The manifest as a DataFrame, text columns as text, however a spreadsheet saved it."""
    if not path.exists():
        raise UserError(f"The manifest {str(path)!r} does not exist; pass manifest=PATH to a .csv or .parquet file.")
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
        return _read_csv(path, sep, text_columns)
    except UnicodeDecodeError as e:
        raise UserError(
            f"The manifest {str(path)!r} is not UTF-8 text (byte {e.start}); save it as 'CSV UTF-8'."
        ) from e
    except (pd.errors.ParserError, OSError, ValueError) as e:
        raise UserError(f"The manifest {str(path)!r} could not be read as {suffix[1:]}: {e}") from e


def _read_parquet(path: Path) -> pd.DataFrame:
    """The columns batch_runner reads as NumPy-backed pandas; passthrough columns keep their Arrow
    type (pd.ArrowDtype), so they reach results.parquet and metadata.parquet as they were: a struct's
    int64 field or an int64 column with nulls would otherwise come back as double."""
    arrow = pq.read_table(path)
    table = arrow.to_pandas()
    for name in arrow.column_names:
        if str(name).strip() not in KNOWN_COLUMNS:
            column = arrow.column(name).to_pandas(types_mapper=pd.ArrowDtype)
            column.index = table.index
            table[name] = column
    return table


def _read_csv(path: Path, sep: str, text_columns: dict[str, type]) -> pd.DataFrame:
    # utf-8-sig drops the BOM that spreadsheets write; only empty cells count as missing, so a
    # prompt that says "NA" stays a prompt.
    return pd.read_csv(path, sep=sep, encoding="utf-8-sig", dtype=text_columns, keep_default_na=False, na_values=[""])


def load_manifest(path: str | Path, model: ModelConfig, base_seed: int, ids: list[str] | None = None) -> Manifest:
    """Read and validate the manifest; problems are collected, not raised, so all are reported."""
    path = Path(path).expanduser().resolve()
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
    if "id" in table.columns:
        table["id"] = [_as_id(v, i) for i, v in enumerate(table["id"])]
    else:
        table.insert(0, "id", [default_id(i) for i in range(len(table))])

    if ids is not None:
        unknown = sorted(set(ids) - set(table["id"]))
        if unknown:
            raise UserError(f"ids={unknown} are not in the manifest {str(path)!r}; check the spelling.")
        table = table[table["id"].isin(set(ids))]

    problems: list[RowProblem] = []
    jobs: list[Job] = []
    first_row_of: dict[str, int] = {}
    for index, record in zip(table.index, table.to_dict("records"), strict=False):
        row_problems, job = _validate_row(index, record, path.parent, model, base_seed, first_row_of)
        problems.extend(row_problems)
        if job is not None and not row_problems:
            jobs.append(job)
    passthrough = [c for c in table.columns if c not in KNOWN_COLUMNS]
    return Manifest(path=path, table=table, jobs=jobs, problems=problems, passthrough=passthrough)


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
    first_row_of: dict[str, int],
) -> tuple[list[RowProblem], Job | None]:
    row_id = record["id"]
    problems: list[RowProblem] = []

    def problem(column: str, reason: str) -> None:
        problems.append(RowProblem(index + 1, row_id or None, column, reason))

    id_reason = id_problem(row_id)
    if id_reason:
        problem("id", id_reason)
    elif row_id in first_row_of:
        problem("id", f"duplicate id, also used by row {first_row_of[row_id]}; ids must be unique")
    else:
        first_row_of[row_id] = index + 1

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

    if frames is not None and (reason := frame_problem(model, frames)):
        problem("num_frames", reason)
    if height is not None and width is not None and (reason := size_problem(model, height, width)):
        problem("height/width", reason)

    if problems or image_path is None:
        return problems, None
    return problems, Job(
        index=index,
        id=row_id,
        image=str(image_path),
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
    fix = "ids name the video files, so use letters, digits, '-', '_' and '.'"
    if not row_id:
        return f"the id is empty; {fix}"
    if _UNSAFE_ID_CHARS.search(row_id) or row_id in (".", "..") or row_id.startswith("~"):
        return f"{row_id!r} could write outside output_dir or is not a portable file name; {fix}"
    if row_id.startswith("."):
        return f"{row_id!r} would be a hidden file; {fix}, not starting with '.'"
    if row_id.endswith((".", " ")) or row_id != row_id.strip():
        return f"{row_id!r} starts or ends with a space or ends with '.'; {fix}"
    if row_id.split(".")[0].lower() in _RESERVED_NAMES:
        return f"{row_id!r} is a file name Windows reserves; rename it"
    if len(row_id.encode()) > MAX_ID_BYTES:
        return f"the id is {len(row_id.encode())} bytes long; keep it under {MAX_ID_BYTES}"
    return None


def _check_image(value: Any, base_dir: Path, problem: Any) -> Path | None:
    if _is_missing(value) or not str(value).strip():
        problem("image", "no image path; give a path relative to the manifest's folder or an absolute one")
        return None
    raw = str(value).strip()
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        problem("image", f"{raw!r} is a folder (looked at {str(path)!r}); give the path of an image file in it")
        return None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        problem(
            "image",
            f"{raw!r} is not a supported image type ({', '.join(IMAGE_SUFFIXES)}); convert it to PNG or JPEG",
        )
        return None
    if not path.is_file():
        problem(
            "image",
            f"{raw!r} does not exist (looked for {str(path)!r}); relative paths are read from the manifest's folder",
        )
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
