"""The typed results row: every record, whatever happened to its row, has the same columns, and the
table's columns are the row's fields (issue #25)."""

from __future__ import annotations

import json
from pathlib import Path

from batch_runner.inputs.manifest import Job
from batch_runner.outputs.results import RESULT_COLUMNS, ResultLog, ResultRow, read_records

# The columns results.parquet had before the row was typed: the typed row must not change them.
COLUMNS_BEFORE = [
    "id",
    "status",
    "video_path",
    "seed",
    "num_frames",
    "height",
    "width",
    "fps",
    "num_inference_steps",
    "guidance_scale",
    "rank",
    "seconds",
    "peak_memory_gib",
    "error",
    "warnings",
    "prompt",
    "negative_prompt",
    "image",
    "last_image",
    "memory_plan",
    "params_hash",
    "finished_at",
]


def job() -> Job:
    return Job(
        index=0,
        id="a",
        image="/in/a.png",
        prompt="the sea",
        negative_prompt="",
        seed=7,
        num_frames=9,
        height=64,
        width=96,
        fps=8.0,
        num_inference_steps=2,
        guidance_scale=6.0,
    )


def test_the_results_columns_start_with_the_columns_they_always_had() -> None:
    assert RESULT_COLUMNS[: len(COLUMNS_BEFORE)] == COLUMNS_BEFORE


def test_ok_failed_and_invalid_rows_are_records_with_the_same_columns(tmp_path: Path) -> None:
    made = ResultRow.from_job(job(), "salt", memory_plan="none").but(seconds=1.5, extra={"model": "tiny"})
    ok, failed = made.ok("videos/a.mp4"), made.failed("RuntimeError: boom")
    invalid = ResultRow.invalid("row000002", "column 'prompt': empty", finished_at="2030-01-01T00:00:00")
    records = [row.record() for row in (ok, failed, invalid)]
    assert all(set(r) - {"model"} == set(RESULT_COLUMNS) for r in records)
    assert (ok.status, ok.video_path, ok.error) == ("ok", "videos/a.mp4", None)
    assert (failed.status, failed.video_path, failed.error) == ("failed", None, "RuntimeError: boom")
    assert records[0]["params_hash"] == job().params_hash("salt") and records[0]["model"] == "tiny"
    assert invalid.error == "invalid row: column 'prompt': empty" and invalid.seed is None

    log = ResultLog(tmp_path, "run1", rank=0)
    for row in (ok.but(finished_at="1"), invalid):
        log.append(row)
    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert lines == [ok.but(finished_at="1").record(), invalid.record()]
    assert read_records(tmp_path)["id"].tolist() == ["a", "row000002"]


def test_extra_fields_are_merged_not_replaced() -> None:
    row = ResultRow(id="a").but(extra={"model": "tiny"}).but(extra={"gpu": "cpu"})
    assert row.record()["model"] == "tiny" and row.record()["gpu"] == "cpu"
