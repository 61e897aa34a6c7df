"""The typed results row: every record, whatever happened to its row, has the same columns, and the
table's columns are the row's fields (issue #25)."""

from __future__ import annotations

import json
from pathlib import Path

from batch_runner.inputs.manifest import Job
from batch_runner.outputs.results import RESULT_COLUMNS, ResultLog, ResultRow, read_records

# The columns results.parquet had before the row was typed: the typed row must not change them.
NOW = "2030-01-01T00:00:00+00:00"
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


def test_every_row_of_five_lands_in_the_results_when_fallback_ids_meet_real_ones(tmp_path: Path) -> None:
    # The reported case: on_invalid=skip ended "3 of 3 rows ok, 0 failed" for five rows, because the
    # row-number ids of the blank and the repeated id were real ids of other rows.
    from batch_runner.inputs.manifest import load_manifest
    from batch_runner.outputs import report
    from batch_runner.outputs.results import merge
    from batch_runner.run import runner
    from tests.conftest import photo, run_config, write_manifest

    image = str(photo(tmp_path / "in.png"))
    ids = ["row000002", "", "row000004", "row000004", "e"]
    rows = [{"id": i, "image": image, "prompt": "the sea"} for i in ids]
    cfg = run_config(f"manifest={write_manifest(tmp_path / 'jobs.csv', rows)}", "model=tiny", "on_invalid=skip")
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed)
    assert manifest.all_record_ids.tolist() == ["row000002", "row000002-2", "row000004", "row000004-2", "e"]

    out = tmp_path / "out"
    (out / "videos").mkdir(parents=True)
    log = ResultLog(out, "run1", rank=0)
    for made in manifest.jobs:
        (out / "videos" / f"{made.id}.mp4").write_bytes(b"v")
        log.append(ResultRow(id=made.id, status="ok", video_path=f"videos/{made.id}.mp4", finished_at=NOW))
    runner._record_invalid(cfg, manifest, out, "run1")
    table = merge(out, manifest)
    assert table["id"].tolist() == manifest.all_record_ids.tolist()
    assert table["status"].tolist() == ["ok", "failed", "ok", "failed", "ok"]
    summary = report.write(out, table, manifest, started=0.0, run_id="run1", html=False)
    assert report.summary_text(summary, out).startswith("3 of 5 rows ok, 2 failed")


def test_a_selected_rows_record_id_is_the_one_it_has_in_the_whole_manifest(tmp_path: Path) -> None:
    from batch_runner.inputs.manifest import load_manifest
    from tests.conftest import photo, run_config, write_manifest

    image = str(photo(tmp_path / "in.png"))
    rows = [{"id": i, "image": image, "prompt": "the sea"} for i in ["a", "a", "row000002"]]
    cfg = run_config(f"manifest={write_manifest(tmp_path / 'jobs.csv', rows)}", "model=tiny")
    manifest = load_manifest(cfg.manifest, cfg.model, cfg.seed, ids=["a"])
    assert manifest.record_ids.tolist() == ["a", "row000002-2"]
    assert list(manifest.invalid_ids) == ["row000002-2"]
