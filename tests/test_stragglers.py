"""A stopped process loses its claimed rows to the other, and its late copy is discarded (the real launch).

Two processes (`accelerate launch --cpu --num_processes 2`); rank 1 is stopped with SIGSTOP as soon
as it has made its first video, while it still holds the other row of its first chunk (8 rows over
two processes: each first claim is two rows). Rank 0 must then make every row; rank 1, continued,
must neither remake nor record any of them again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil

from tests.conftest import ROOT, accelerate_cpu, photo, write_manifest

ROWS = [f"r{i}" for i in range(8)]


def wait_for(condition, what: str, limit: float = 300.0, every: float = 0.02):
    """Poll `condition` until it holds (returns its value); a generous limit only against a hang."""
    deadline = time.monotonic() + limit
    while not (value := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(every)
    return value


def recorded(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for part in sorted((out / "parts").glob("*.jsonl"))
        for line in part.read_text().splitlines()
        if line.strip()
    ]


def rank_one(launcher: psutil.Process) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == "1":
                return child
        except psutil.Error:
            continue
    return None


def test_a_stopped_process_loses_its_rows_and_every_row_is_recorded_once(tmp_path: Path) -> None:
    images = [photo(tmp_path / "in" / f"{i}.png", seed=n) for n, i in enumerate(ROWS)]
    rows = [{"id": i, "image": str(image), "prompt": f"a boat {i}"} for i, image in zip(ROWS, images, strict=True)]
    manifest = write_manifest(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    # Rows of a second or so: the test must stop rank 1 between its first record and its second (the
    # time of one row), however busy the machine. A claim timeout well above a slow start's pause:
    # rank 1 must keep its rows until it is stopped.
    settings = ["model=tiny", "model.num_inference_steps=24", "chunk_size=2", "claim_timeout=15"]
    command = [*accelerate_cpu(2), str(ROOT / "run.py"), f"manifest={manifest}", f"output_dir={out}", *settings]
    log = (tmp_path / "launch.log").open("w")
    launch = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    stopped = None
    try:
        launcher = psutil.Process(launch.pid)
        worker = wait_for(lambda: rank_one(launcher), "rank 1 to start")
        # Its first row recorded, it is making the second of its chunk (or about to start it).
        wait_for(lambda: any(r["rank"] == 1 for r in recorded(out)), "rank 1's first row", every=0.01)
        worker.send_signal(signal.SIGSTOP)
        stopped = worker
        # Rank 0 makes every row, rank 1's held ones too, while rank 1 stays stopped.
        wait_for(lambda: {r["id"] for r in recorded(out)} == set(ROWS), "every row recorded", limit=150, every=0.2)
        assert worker.status() == psutil.STATUS_STOPPED
        by_rank_one = [r["id"] for r in recorded(out) if r["rank"] == 1]
        assert len(by_rank_one) == 1, "rank 1 was stopped within its first chunk of two rows"
        worker.send_signal(signal.SIGCONT)
        stopped = None
        code = launch.wait(timeout=300)
    finally:
        if stopped is not None:
            stopped.send_signal(signal.SIGCONT)
        if launch.poll() is None:
            launch.kill()
        log.close()
    text = (tmp_path / "launch.log").read_text()
    assert code == 0, text[-4000:]
    assert "Traceback" not in text
    made = [r["id"] for r in recorded(out)]
    assert sorted(made) == sorted(ROWS), "each row recorded once: rank 1's late copy was discarded"
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["id"]) == sorted(ROWS) and table["id"].is_unique
    assert (table["status"] == "ok").all(), table[["id", "status", "error"]]
    assert sorted(p.name for p in (out / "videos").glob("*.mp4")) == sorted(f"{i}.mp4" for i in ROWS)
    assert not list((out / "videos").glob(".*partial")), "no copy left half-written"
    assert len([r for r in recorded(out) if r["rank"] == 1]) <= 1, "rank 1 made nothing more once continued"


def test_a_copy_finished_second_leaves_neither_a_video_nor_a_record(tmp_path: Path) -> None:
    import numpy as np

    from batch_runner.inputs.manifest import Job
    from batch_runner.outputs.results import ResultRow
    from batch_runner.run import runner
    from tests.conftest import run_config

    cfg = run_config("manifest=unused.csv", "model=tiny", "output.report=false")
    job = Job(0, "a", str(photo(tmp_path / "a.png")), "sea", "", 1, 3, 4, 6, 8.0, 2, 6.0)
    frames = np.random.default_rng(0).integers(0, 255, (3, 4, 6, 3)).astype(np.uint8)
    row = ResultRow.from_job(job, "")
    finished: list[ResultRow] = []
    for first in (False, True):
        runner._publish(tmp_path, job, frames, None, row, cfg, finished.append, lambda first=first: first)
        videos = sorted(p.name for p in (tmp_path / "videos").iterdir())
        assert videos == (["a.mp4"] if first else []), "only the first copy is renamed into place; no staged copy stays"
        assert [r.status for r in finished] == (["ok"] if first else [])
