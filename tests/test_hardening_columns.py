"""A manifest's columns never collide with the runner's (issue #26, item 2): a column named like one
the runner writes is carried as manifest_<name>, and a previous run's results.parquet is a manifest
of its row inputs. Decided when the manifest is read, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from batch_runner.columns import KNOWN_COLUMNS, PROVENANCE_COLUMNS, RESULT_COLUMNS, RUNNER_COLUMNS
from batch_runner.errors import UserError
from batch_runner.inputs.manifest import load_manifest
from batch_runner.outputs import dataset
from batch_runner.outputs.results import ResultLog, ResultRow, merge
from tests.conftest import photo, run_config, write_manifest

CFG = run_config("manifest=unused.csv", "model=tiny")


def load(path: Path):
    return load_manifest(path, CFG.model, 0)


def test_the_runner_columns_the_manifest_avoids_are_every_column_the_runner_writes(tmp_path: Path) -> None:
    row = {"id": "a", "image": str(photo(tmp_path / "a.png")), "prompt": "sea", "label": 1}
    manifest = load(write_manifest(tmp_path / "m.csv", [row]))
    out = tmp_path / "out"
    ResultLog(out, "r", 0).append(ResultRow(id="a", status="ok", video_path="videos/a.mp4", finished_at="1"))
    table = merge(out, manifest)
    metadata = pd.read_parquet(dataset.write_metadata(out, table, manifest))
    written = {*table.columns, *metadata.columns} - set(KNOWN_COLUMNS) - set(manifest.passthrough)
    assert written == set(RUNNER_COLUMNS)


def test_user_columns_named_like_the_runners_are_renamed_up_front_and_reach_the_metadata(tmp_path: Path) -> None:
    image = str(photo(tmp_path / "a.png"))
    rows = [{"id": "a", "image": image, "prompt": "sea", "model": "mine", "rank": 3, "status": "new", "label": 1}]
    manifest = load(write_manifest(tmp_path / "m.csv", rows))
    assert manifest.passthrough == ["manifest_model", "manifest_rank", "manifest_status", "label"]
    (note,) = manifest.notes
    assert "'model' -> 'manifest_model', 'rank' -> 'manifest_rank', 'status' -> 'manifest_status'" in note

    out = tmp_path / "out"
    (out / "videos").mkdir(parents=True)
    (out / "videos" / "a.mp4").write_bytes(b"v")
    ResultLog(out, "r", 0).append(
        ResultRow(id="a", status="ok", video_path="videos/a.mp4", rank=0, finished_at="1").but(extra={"model": "tiny"})
    )
    table = merge(out, manifest)
    assert table.columns.is_unique
    assert table.loc[0, ["model", "manifest_model", "rank", "manifest_rank"]].tolist() == ["tiny", "mine", 0, 3]
    metadata = pd.read_parquet(dataset.write_metadata(out, table, manifest))
    assert metadata.columns.is_unique
    assert metadata.loc[0, ["file_name", "model", "manifest_model", "label"]].tolist() == [
        "videos/a.mp4",
        "tiny",
        "mine",
        1,
    ]


def test_a_renamed_column_that_would_meet_another_is_refused_naming_both(tmp_path: Path) -> None:
    rows = [{"image": "a.png", "prompt": "sea", "rank": 1, "manifest_rank": 2}]
    with pytest.raises(UserError, match=r"has a column 'rank', .* and a column 'manifest_rank' as well; rename one"):
        load(write_manifest(tmp_path / "m.csv", rows))


def test_a_previous_runs_results_are_a_manifest_of_their_row_inputs(tmp_path: Path) -> None:
    image = str(photo(tmp_path / "a.png"))
    previous = {c: None for c in [*RESULT_COLUMNS, *PROVENANCE_COLUMNS]} | {
        "id": "a",
        "image": image,
        "prompt": "sea",
        "seed": 2**62 + 1,
        "status": "ok",
        "params_hash": "h",
        "finished_at": "1",
        "model": "tiny-cogvideox",
        "label": 4,
    }
    invalid = {c: None for c in previous} | {"id": "row000002", "status": "failed", "finished_at": "1"}
    path = tmp_path / "results.parquet"
    table = pd.DataFrame([previous, invalid])
    table["seed"] = pd.array([2**62 + 1, None], dtype="Int64")  # as results.parquet stores it
    table.to_parquet(path)
    manifest = load(path)
    assert manifest.passthrough == ["label"]
    assert "previous run's results table" in manifest.notes[0] and "status" in manifest.notes[0]
    (job,) = manifest.jobs
    assert (job.id, job.seed, job.prompt) == ("a", 2**62 + 1, "sea")  # the seed as it was, not via float
    assert [p.column for p in manifest.problems] == ["prompt", "image"]  # the row it had refused stays refused


@pytest.mark.slow
def test_a_previous_runs_results_parquet_fed_back_as_the_manifest_makes_every_row(tmp_path: Path) -> None:
    from batch_runner.run import runner

    rows = [
        {"id": i, "image": str(photo(tmp_path / f"{i}.png", seed=n)), "prompt": "sea", "rank": n, "label": n}
        for n, i in enumerate("ab")
    ]
    first = tmp_path / "first"
    cfg = ("model=tiny", "model.num_inference_steps=1")
    assert (
        runner.run(run_config(f"manifest={write_manifest(tmp_path / 'm.csv', rows)}", *cfg, f"output_dir={first}")) == 0
    )
    again = tmp_path / "again"
    assert runner.run(run_config(f"manifest={first / 'results.parquet'}", *cfg, f"output_dir={again}")) == 0
    results = pd.read_parquet(again / "results.parquet")
    assert results["id"].tolist() == ["a", "b"] and set(results["status"]) == {"ok"}
    assert results["manifest_rank"].tolist() == [0, 1] and results["label"].tolist() == [0, 1]
    before = pd.read_parquet(first / "results.parquet")
    assert results["seed"].tolist() == before["seed"].tolist()
    assert len(pd.read_parquet(again / "metadata.parquet")) == 2 and (again / "report.html").is_file()
