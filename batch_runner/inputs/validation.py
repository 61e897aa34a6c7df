"""Judging a manifest's columns and rows before any model loads.

Every bad row is collected, not raised, naming the row, its id, the column and the fix, so that a run
over thousands of rows is never stopped halfway by row 2,000. ROW_RANGES is the one table of what a
row's numbers may be; the model's defaults for those columns are checked against it too (run/checks.py).
"""

from __future__ import annotations

import math
import numbers
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batch_runner.columns import RUNNER_COLUMNS
from batch_runner.config import ModelConfig
from batch_runner.errors import UserError
from batch_runner.families import family_of
from batch_runner.inputs.ids import SeenIds, derive_seed, id_problem
from batch_runner.inputs.reading import is_missing, not_a_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_SEED = 2**63 - 1
# A row's numeric column -> (lowest, highest, whole number?), both ends allowed.
ROW_RANGES: dict[str, tuple[float, float, bool]] = {
    "seed": (0, MAX_SEED, True),
    "num_frames": (1, 10_000, True),
    "num_inference_steps": (1, 1000, True),
    "height": (8, 8192, True),
    "width": (8, 8192, True),
    "fps": (0.1, 240.0, False),
    "guidance_scale": (0.0, 100.0, False),
}


@dataclass(frozen=True)
class RowProblem:
    row: int
    id: str | None
    column: str
    reason: str

    def __str__(self) -> str:
        who = f"row {self.row}" + (f" (id {self.id!r})" if self.id is not None else "")
        return f"{who}, column '{self.column}': {self.reason}."


_RESULTS_SIGNATURE = ("status", "params_hash", "finished_at")
RENAMED_PREFIX = "manifest_"


def own_columns(path: Path, table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
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


def check_columns(path: Path, table: pd.DataFrame, output_format: str) -> None:
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


def validate_row(
    index: int,
    record: dict[str, Any],
    base_dir: Path,
    model: ModelConfig,
    base_seed: int,
    seen: SeenIds,
) -> tuple[list[RowProblem], dict[str, Any] | None]:
    """The row's problems, and, when it has none, the fields of its Job (every default filled in)."""
    row_id = record["id"]
    problems: list[RowProblem] = []

    def problem(column: str, reason: str) -> None:
        problems.append(RowProblem(index + 1, row_id or None, column, reason))

    id_reason = id_problem(row_id) or seen.clash(row_id, index + 1)
    if id_reason:
        problem("id", id_reason)

    prompt = record.get("prompt")
    if is_missing(prompt) or not str(prompt).strip():
        problem("prompt", "the prompt is empty; write what the video should show")
    image_path = _check_image(record.get("image"), base_dir, problem)

    negative = record.get("negative_prompt")
    negative = model.negative_prompt if is_missing(negative) else str(negative)

    seed = _integer(record, "seed", None, problem)
    frames = _integer(record, "num_frames", model.num_frames, problem)
    steps = _integer(record, "num_inference_steps", model.num_inference_steps, problem)
    height = _integer(record, "height", model.height, problem)
    width = _integer(record, "width", model.width, problem)
    guidance = _number(record, "guidance_scale", model.guidance_scale, problem)
    fps = _number(record, "fps", model.fps, problem)

    family = family_of(model)
    for column, reason in family.row_problems(model, frames, height, width, steps):
        problem(column, reason)
    last_image = None
    if not is_missing(record.get("last_image")) and str(record.get("last_image")).strip():
        if family.takes_last_image(model):
            last_image = _check_image(record.get("last_image"), base_dir, problem, column="last_image")
        else:
            problem("last_image", f"{model.name} makes videos from a first frame only; leave last_image empty")

    if problems or image_path is None:
        return problems, None
    return problems, dict(
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


def image_path(cell: str, base_dir: Path) -> Path | None:
    """The file an image cell names: a path absolute or relative to the manifest's folder (`~`
    expanded), or a file:// URL's (what a browser's "copy link" gives); None for any other URL."""
    raw = cell.strip()
    if raw.startswith("file://"):
        raw = urllib.parse.unquote(urllib.parse.urlparse(raw).path)
    if "://" in raw:
        return None
    path = Path(raw).expanduser()
    return path if path.is_absolute() else base_dir / path


def _check_image(value: Any, base_dir: Path, problem: Any, column: str = "image") -> Path | None:
    if isinstance(value, (bytes, bytearray)):
        problem(
            column,
            "holds bytes, not a path (a Parquet binary column); store the paths as text, or write embedded "
            "images to files and give their paths",
        )
        return None
    if is_missing(value) or not str(value).strip():
        problem(column, "no image path; give a path relative to the manifest's folder or an absolute one")
        return None
    raw = str(value).strip()
    path = image_path(raw, base_dir)
    if path is None:
        problem(column, f"{raw!r} is a URL; download the image and give its path on disk")
        return None
    if path.is_dir():
        problem(column, f"{raw!r} is a folder (looked at {str(path)!r}); give the path of an image file in it")
        return None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        problem(
            column,
            f"{raw!r} is not a supported image type ({', '.join(IMAGE_SUFFIXES)}); convert it to PNG or JPEG",
        )
        return None
    what = not_a_file(path)
    if what == "does not exist":
        slashes = "; separate folders with '/', not '\\'" if "\\" in raw else ""
        problem(
            column,
            f"{raw!r} does not exist (looked for {str(path)!r}); relative paths are read from the manifest's "
            f"folder{slashes}",
        )
        return None
    if what:
        problem(column, f"{raw!r} {what} (looked at {str(path)!r}); give the path of an image file")
        return None
    return path.resolve()


def _integer(record: dict, column: str, default: int | None, problem: Any) -> int | None:
    lo, hi, _ = ROW_RANGES[column]
    value = record.get(column)
    if is_missing(value):
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


def _number(record: dict, column: str, default: float, problem: Any) -> float | None:
    lo, hi, _ = ROW_RANGES[column]
    value = record.get(column)
    if is_missing(value):
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
