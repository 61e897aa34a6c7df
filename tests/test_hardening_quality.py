"""No silent garbage in the dataset (issue #26, item 10): a constant or non-finite video fails its row
with a reason and is not written, and every row's results and metadata carry its motion and brightness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batch_runner.inputs.manifest import Job, load_manifest
from batch_runner.outputs import dataset
from batch_runner.outputs.quality import measure
from batch_runner.outputs.results import ResultLog, ResultRow, merge
from batch_runner.run import runner
from tests.conftest import photo, run_config, write_manifest


def video(values: list[int], size: tuple[int, int] = (4, 6)) -> np.ndarray:
    """Frames each of one grey level."""
    return np.stack([np.full((*size, 3), v, np.uint8) for v in values])


def test_motion_is_the_mean_absolute_difference_of_consecutive_frames_on_a_0_to_1_scale() -> None:
    quality = measure(video([0, 51, 51, 255]))
    assert quality.motion == pytest.approx((51 + 0 + 204) / 3 / 255, abs=1e-6)
    assert quality.brightness == pytest.approx((0 + 51 + 51 + 255) / 4 / 255, abs=1e-6)
    assert quality.problem is None
    assert measure(video([255, 0]).astype(np.float32) / 255).motion == pytest.approx(1.0)


def test_a_constant_video_is_a_problem_and_a_single_frame_is_not() -> None:
    quality = measure(video([17] * 5))
    assert quality.motion == 0.0 and quality.problem.startswith("constant video: all 5 frames are identical")
    assert measure(video([17])).problem is None and measure(video([17])).motion is None


def test_non_finite_frames_are_a_problem() -> None:
    frames = np.zeros((3, 4, 6, 3), np.float32)
    frames[1, 0, 0, 0] = np.nan
    assert "NaN or infinite" in measure(frames).problem


def job(tmp_path: Path) -> Job:
    return Job(0, "a", str(photo(tmp_path / "a.png")), "sea", "", 1, 3, 4, 6, 8.0, 2, 6.0)


@pytest.mark.parametrize(("values", "status"), [([10, 10, 10], "failed"), ([10, 60, 10], "ok")])
def test_a_constant_video_fails_its_row_and_is_not_written(tmp_path: Path, values: list[int], status: str) -> None:
    cfg = run_config("manifest=unused.csv", "model=tiny", "output.report=false")
    finished: list[ResultRow] = []
    row = ResultRow.from_job(job(tmp_path), "")
    runner._publish(tmp_path, job(tmp_path), video(values), None, row, cfg, finished.append)
    (done,) = finished
    assert done.status == status and (tmp_path / "videos" / "a.mp4").is_file() == (status == "ok")
    assert done.brightness == pytest.approx(np.mean(values) / 255, abs=1e-6)
    if status == "failed":
        assert done.error.startswith("constant video: all 3 frames are identical") and done.motion == 0.0


def test_motion_and_brightness_reach_results_and_metadata(tmp_path: Path) -> None:
    rows = [{"id": "a", "image": str(photo(tmp_path / "a.png")), "prompt": "sea"}]
    manifest = load_manifest(write_manifest(tmp_path / "m.csv", rows), run_config("manifest=x", "model=tiny").model, 0)
    out = tmp_path / "out"
    (out / "videos").mkdir(parents=True)
    (out / "videos" / "a.mp4").write_bytes(b"v")
    made = ResultRow(id="a", status="ok", video_path="videos/a.mp4", motion=0.05, brightness=0.4, finished_at="1")
    ResultLog(out, "r", 0).append(made)
    table = merge(out, manifest)
    metadata = pd.read_parquet(dataset.write_metadata(out, table, manifest))
    for frame in (table, metadata):
        assert frame.loc[0, ["motion", "brightness"]].tolist() == [0.05, 0.4]
