"""A disk that really fills up: a small tmpfs mounted for the test (root only; skipped elsewhere).

tests/test_output_dir.py injects the errors; these run the command line into a real full file
system, where the kernel decides which write fails and how much of it lands.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from batch_runner.outputs.report import save_previews
from batch_runner.outputs.video import read_video
from tests.conftest import run_cli, write_manifest
from tests.test_faults import good_rows

pytestmark = pytest.mark.slow  # mounts a file system (a process)


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder` for the block; the test is skipped where none can be."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """A file that takes all but about `leave_bytes` of `disk`: free it to make room again."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(1, stats.f_bavail * stats.f_frsize - leave_bytes))
    return filler


def test_a_preview_on_a_full_disk_fails_rather_than_landing_cut_short(tmp_path: Path) -> None:
    """Pillow's encoder takes a short write on a full disk for a whole one: a truncated preview was
    published under its name, and an ok row kept it for good."""
    frames = np.random.default_rng(0).integers(0, 256, (9, 480, 720, 3), dtype=np.uint8)
    with small_disk(tmp_path / "disk", "256k") as disk:
        fill(disk, leave_bytes=8192)
        with pytest.raises(OSError):
            save_previews(disk / "out", "r0", frames, Image.fromarray(frames[0]))
        for preview in (disk / "out").rglob("*.jpg"):
            Image.open(preview).load()  # each one there is whole


def test_a_start_up_record_on_a_full_disk_keeps_the_last_whole_one(tmp_path: Path) -> None:
    """Written in place, the record was truncated before its write failed: an empty file was left."""
    import json

    from batch_runner.run import startup

    with small_disk(tmp_path / "disk", "256k") as disk:
        record = disk / "logs" / "startup-rank00000.json"
        startup.save(record, 0)
        fill(disk, leave_bytes=0)
        with pytest.raises(OSError):
            startup.save(record, 0)
        assert json.loads(record.read_text())["rank"] == 0
        assert [p.name for p in record.parent.iterdir()] == [record.name]  # no temporary left


def test_a_run_that_fills_its_disk_stops_in_one_sentence_and_the_rerun_after_freeing_it_finishes(
    tmp_path: Path,
) -> None:
    manifest = write_manifest(tmp_path / "jobs.csv", good_rows(tmp_path / "inputs", 6))
    with small_disk(tmp_path / "disk", "4m") as disk:
        out = disk / "out"
        filler = fill(disk, leave_bytes=100_000)  # room for a row or so
        full = run_cli(f"manifest={manifest}", "model=tiny", f"output_dir={out}", cwd=tmp_path)
        assert full.returncode == 2, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        assert last.startswith("error: Could not ") and "No space left on device" in last, full.stderr[-3000:]
        assert "free space there or pick another output_dir, then rerun the same command." in last
        assert "Traceback" not in full.stderr
        filler.unlink()
        again = run_cli(f"manifest={manifest}", "model=tiny", f"output_dir={out}", cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        table = pd.read_parquet(out / "results.parquet")
        assert sorted(table["id"]) == [f"good{i}" for i in range(6)] and set(table["status"]) == {"ok"}
        for row_id in table["id"]:
            assert read_video(out / "videos" / f"{row_id}.mp4")[0].shape[0] > 0
        for preview in (out / "previews").glob("*.jpg"):
            Image.open(preview).load()


def test_a_run_on_a_disk_full_from_the_start_can_be_rerun_once_there_is_room(tmp_path: Path) -> None:
    """It could not write its lock's record: the empty lock it left made the advised rerun refuse
    the folder as someone else's."""
    manifest = write_manifest(tmp_path / "jobs.csv", good_rows(tmp_path / "inputs", 2))
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "out"
        filler = fill(disk, leave_bytes=0)
        full = run_cli(f"manifest={manifest}", "model=tiny", f"output_dir={out}", cwd=tmp_path)
        assert full.returncode == 2 and "No space left on device" in full.stderr, full.stderr[-3000:]
        filler.unlink()
        again = run_cli(f"manifest={manifest}", "model=tiny", f"output_dir={out}", cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert set(pd.read_parquet(out / "results.parquet")["status"]) == {"ok"}
