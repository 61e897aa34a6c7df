"""The results table, kept so that no finished row is ever lost or counted twice.

Each process appends one JSON line per finished row to its own part file under parts/, flushed and
fsynced right after the row's video was renamed into place: a row's result is durable as soon as
its video is. A line cut short by a kill is ignored. The main process merges all parts of all runs
(the newest record of each id wins) with the manifest's own columns into results.parquet once every
process has finished, and again at the start of the next run.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd

from batch_runner.columns import PROVENANCE_COLUMNS, RESULT_COLUMNS, STAGE_COLUMNS, ResultColumns
from batch_runner.inputs.manifest import Job, Manifest
from batch_runner.outputs.storage import append_nofollow, atomic_write_parquet, atomic_write_text

log = logging.getLogger(__name__)

PARTS_DIR = "parts"
RESULTS_FILE = "results.parquet"


@dataclass(frozen=True)
class ResultRow(ResultColumns):
    """One row of the results table, as one line of a part file.

    Built only through its constructors, so that every record has the same fields whatever happened
    to its row: `from_job` (a valid row about to be made), then `.ok(video_path)` or `.failed(error)`;
    `invalid` (a row the manifest refused, under on_invalid=skip). The results columns are its fields
    (declared in batch_runner.columns, in their order); `extra` (provenance, and anything a run adds
    per row) follows them in the record.
    """

    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_job(cls, job: Job, salt: str, warnings: str | None = None, memory_plan: str | None = None) -> ResultRow:
        """A valid row before it is made: its inputs, with every default filled in."""
        return cls(
            id=job.id,
            seed=job.seed,
            num_frames=job.num_frames,
            height=job.height,
            width=job.width,
            fps=job.fps,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            image=job.image,
            last_image=job.last_image,
            params_hash=job.params_hash(salt),
            warnings=warnings,
            memory_plan=memory_plan,
        )

    @classmethod
    def invalid(cls, row_id: str, reason: str, finished_at: str, **given: str | None) -> ResultRow:
        """A row the manifest refused: its (record) id, why, and the text inputs it `given` (prompt,
        negative_prompt, image, last_image as the manifest wrote them), so that the record is a row
        of a manifest again."""
        return cls(id=row_id, status="failed", error=f"invalid row: {reason}", finished_at=finished_at, **given)

    def ok(self, video_path: str) -> ResultRow:
        return replace(self, status="ok", video_path=video_path, error=None)

    def failed(self, error: str) -> ResultRow:
        return replace(self, status="failed", error=error[:2000])

    def but(self, **changes: Any) -> ResultRow:
        """This row with some fields changed (timing, plan, warnings, rank); `extra` keys are merged."""
        extra = changes.pop("extra", None)
        row = replace(self, **changes)
        return replace(row, extra=self.extra | extra) if extra else row

    def record(self) -> dict[str, Any]:
        """The JSON line's fields: `extra` first (as the runner always wrote them), then the columns."""
        columns = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return self.extra | columns


_DTYPES = {
    "seed": "Int64",
    "num_frames": "Int64",
    "height": "Int64",
    "width": "Int64",
    "num_inference_steps": "Int64",
    "rank": "Int64",
    "gpus_per_replica": "Int64",
    "vae_tile": "Int64",
    "fps": "float64",
    "guidance_scale": "float64",
    "seconds": "float64",
    **dict.fromkeys(STAGE_COLUMNS, "float64"),
    "peak_memory_gib": "float64",
    "motion": "float64",
    "brightness": "float64",
    "has_audio": "boolean",
    "audio_sample_rate": "Int64",
}


class ResultLog:
    """This process's append-only part file; safe to call from the video-writer thread."""

    def __init__(self, output_dir: Path, run_id: str, rank: int) -> None:
        self.path = output_dir / PARTS_DIR / f"{run_id}.rank{rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, row: ResultRow) -> None:
        line = json.dumps(row.record(), ensure_ascii=False, default=str) + "\n"
        with self._lock, append_nofollow(self.path) as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_records(output_dir: Path) -> pd.DataFrame:
    """The newest record of each id over every part file; torn last lines are dropped for good."""
    rows: list[dict[str, Any]] = []
    for part in sorted((output_dir / PARTS_DIR).glob("*.jsonl")):
        rows.extend(_read_part(part))
    if not rows:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    table = pd.DataFrame(rows)
    table = table.sort_values("finished_at", kind="stable").drop_duplicates("id", keep="last")
    return table.reset_index(drop=True)


def _read_part(part: Path) -> list[dict[str, Any]]:
    """A part file's records. A line cut short by a kill is reported once and removed from the file
    (rewritten atomically with its whole lines): its row has no video under its final name either,
    so it is simply made again, and later runs do not warn about it again."""
    good, torn = [], []
    with open(part, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                good.append((line if line.endswith("\n") else line + "\n", json.loads(line)))
            except json.JSONDecodeError:
                torn.append(number)
    if torn:
        log.warning(
            "dropped %d unfinished line(s) %s of %s (a process was killed, or its disk was full)",
            len(torn),
            torn,
            part.name,
        )
        atomic_write_text("".join(line for line, _ in good), part)
    return [record for _, record in good]


def finished_ids(output_dir: Path, manifest: Manifest, salt: str) -> set[str]:
    """Ids whose video is done and still matches its row: ok, video on disk, same parameters.

    `salt` fingerprints the settings that change outputs (model, scheduler, approximations), so a
    rerun with another model regenerates everything while a rerun with another memory plan does not.
    """
    records = read_records(output_dir)
    if records.empty:
        return set()
    wanted = {job.id: job for job in manifest.jobs}
    done = set()
    for record in records.to_dict("records"):
        job = wanted.get(record["id"])
        if job is None or record.get("status") != "ok" or not record.get("video_path"):
            continue
        video = output_dir / record["video_path"]
        if record.get("params_hash") == job.params_hash(salt) and video.is_file() and video.stat().st_size > 0:
            done.add(job.id)
    return done


def merge(output_dir: Path, manifest: Manifest) -> pd.DataFrame:
    """Write results.parquet: one row per manifest row that has a record, in manifest order.

    Every row of the manifest counts, also rows `ids=` left out of this run: their records from
    earlier runs stay.
    """
    records = read_records(output_dir)
    ids = manifest.all_record_ids
    order = {row_id: i for i, row_id in enumerate(ids)}
    known = records["id"].isin(order.keys())
    if not known.all():
        others = records.loc[~known, "id"].nunique()
        log.warning(
            "output_dir holds %d row(s) of another manifest (e.g. %r): results.parquet, metadata.parquet and the "
            "report list this manifest's rows only; their videos stay in videos/, and a run of that manifest lists "
            "them again",
            others,
            records.loc[~known, "id"].iloc[0],
        )
    records = records[known].copy()
    records["_order"] = records["id"].map(order)
    records = records.sort_values("_order").drop(columns="_order")
    for column in RESULT_COLUMNS + PROVENANCE_COLUMNS:
        if column not in records.columns:
            records[column] = None
    table = records[RESULT_COLUMNS + PROVENANCE_COLUMNS].astype(_DTYPES)
    # A duplicate id (refused, recorded under on_invalid=skip) must not double its first row here.
    # Passthrough columns never share a name with the table's (load_manifest renamed or dropped those).
    passthrough = manifest.rows[manifest.passthrough].assign(id=ids).drop_duplicates("id")
    table = table.merge(passthrough, on="id", how="left", validate="one_to_one")
    atomic_write_parquet(table, output_dir / RESULTS_FILE)
    return table
