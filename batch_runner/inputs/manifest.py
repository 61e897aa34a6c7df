"""A manifest (CSV or Parquet) read into validated jobs: `load_manifest` and the `Job` it makes of each row.

The steps live beside it: reading the file (inputs/reading.py), row ids (inputs/ids.py) and judging
the columns and rows (inputs/validation.py). Validation runs before any model loads and reports every
bad row at once, naming the row, its id, the column and the fix, so that a run over thousands of rows
is never stopped halfway by row 2,000.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from batch_runner.columns import KNOWN_COLUMNS, REQUIRED_COLUMNS
from batch_runner.config import ModelConfig, runs_guidance
from batch_runner.errors import UserError
from batch_runner.inputs.ids import SeenIds, as_id, default_id, record_ids
from batch_runner.inputs.reading import is_missing, read_table
from batch_runner.inputs.validation import RowProblem, check_columns, image_path, own_columns, validate_row

# The problems a refusal lists one by one; the rest it counts by column.
LISTED_PROBLEMS = 20


# The text inputs a refused row keeps in its failed record.
INPUT_TEXTS = ("prompt", "negative_prompt", "image", "last_image")


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
    def guided(self) -> bool:
        """Whether this row runs classifier-free guidance (`runs_guidance`): its negative prompt is
        encoded, and its unconditional pass runs."""
        return runs_guidance(self.guidance_scale)

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

    def refusal(self) -> str:
        """The sentence that refuses this manifest's invalid rows: a line per problem, the first
        `LISTED_PROBLEMS` of them, then how many more each column has (a moved image folder makes a
        problem of every row, and 200,000 lines would bury the first)."""
        listed, rest = self.problems[:LISTED_PROBLEMS], self.problems[LISTED_PROBLEMS:]
        lines = [f"  - {p}" for p in listed]
        if rest:
            columns = Counter(p.column for p in rest).most_common()
            more = ", ".join(f"{n:,} in column '{column}'" for column, n in columns)
            lines.append(f"  - ... and {len(rest):,} more problem(s) like these: {more}.")
        rows = len({p.row for p in self.problems})
        return (
            f"The manifest {str(self.path)!r} has {rows:,} invalid row(s); nothing was run or written:\n"
            + "\n".join(lines)
            + "\nFix them, or pass on_invalid=skip to record them as failed (each with its reason in "
            "results.parquet) and make the other rows."
        )

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

    @property
    def invalid_inputs(self) -> dict[str, dict[str, str | None]]:
        """Record id -> the text inputs of each refused row as the manifest gives them (image paths
        made absolute from its folder), so that its failed record keeps what the user wrote."""
        record_ids = self.record_ids
        given = {}
        for row in sorted({p.row for p in self.problems}):
            cells = self.table.loc[row - 1]
            inputs = {c: None if is_missing(cells[c]) else str(cells[c]) for c in INPUT_TEXTS if c in cells.index}
            for column in ("image", "last_image"):
                if inputs.get(column) and (path := image_path(inputs[column], self.path.parent)):
                    inputs[column] = str(path)
            given[record_ids[row - 1]] = inputs
        return given


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
        cased = {c: next((f for f in table.columns if f.lower() == c), None) for c in missing}
        renames = [f"{given!r} to {c!r}" for c, given in cased.items() if given]
        fix = f"rename {', '.join(renames)} (column names are lower case)" if renames else "add them to its header row"
        raise UserError(
            f"The manifest {str(path)!r} lacks the required column(s) {', '.join(map(repr, missing))} "
            f"(found {found}); {fix}."
        )
    table = table.reset_index(drop=True)
    table, notes = own_columns(path, table)
    if "id" in table.columns:
        table["id"] = [as_id(v, i) for i, v in enumerate(table["id"])]
    else:
        table.insert(0, "id", [default_id(i) for i in range(len(table))])

    check_columns(path, table, output_format)
    selected = table
    if ids is not None:
        unknown = sorted(set(ids) - set(table["id"]))
        if unknown:
            raise UserError(f"ids={unknown} are not in the manifest {str(path)!r}; check the spelling.")
        selected = table[table["id"].isin(set(ids))]

    problems: list[RowProblem] = []
    jobs: list[Job] = []
    seen = SeenIds(webdataset=output_format == "webdataset")
    for index, record in zip(table.index, table.to_dict("records"), strict=False):
        row_problems, fields = validate_row(index, record, path.parent, model, base_seed, seen)
        if index not in selected.index:
            continue
        problems.extend(row_problems)
        if fields is not None and not row_problems:
            jobs.append(Job(index=index, **fields))
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
