"""Parallel video encoders (batch_runner/outputs/writers.py): the same bytes as one writer, rows in order, once."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from batch_runner.inputs.manifest import Job
from batch_runner.outputs.results import ResultRow
from batch_runner.outputs.video import write_video
from batch_runner.outputs.writers import Writers, encoder_count
from batch_runner.run import runner
from tests.conftest import run_config
from tests.test_video import frames

WAIT = 60  # seconds: only a broken writer pool takes this long (every wait here is on a condition)


def video(i: int) -> np.ndarray:
    """Row i's frames: the moving noisy gradient of test_video, shifted so that every row differs."""
    return np.roll(frames()[:9], 7 * i, axis=2)


def job(i: int) -> Job:
    return Job(i, f"r{i}", "-", "sea", "", i, 9, 240, 320, 8.0, 2, 6.0)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.mp4"))}


def test_rows_published_by_parallel_encoders_have_the_bytes_and_the_order_of_one_serial_writer(tmp_path):
    """runner._publish (quality, video, result row) for 6 rows on 4 encoders, against one after another."""
    cfg = run_config("manifest=unused.csv", "model=tiny", "output.report=false")
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    alone: list[ResultRow] = []
    for i in range(6):
        runner._publish(serial, job(i), video(i), None, ResultRow.from_job(job(i), ""), cfg, alone.append)
    together: list[ResultRow] = []
    with Writers(together.append, workers=4) as writers:
        for i in range(6):
            writers.wait_for_room()
            row = ResultRow.from_job(job(i), "")
            writers.submit(
                lambda publish, i=i, row=row: runner._publish(parallel, job(i), video(i), None, row, cfg, publish)
            )
    assert digests(parallel / "videos") == digests(serial / "videos") and len(digests(serial / "videos")) == 6
    assert [r.id for r in together] == [r.id for r in alone] == [f"r{i}" for i in range(6)]
    assert all(r.status == "ok" for r in together)
    drop = {"write_seconds": None}  # the only field that is a measurement
    assert [dataclasses.replace(r, **drop) for r in together] == [dataclasses.replace(r, **drop) for r in alone]


def test_encoders_running_at_once_write_what_one_encoder_writes(tmp_path):
    """Four encodes held until all four have started, then run together: byte for byte the serial files."""
    for i in range(4):
        write_video(video(i), tmp_path / "serial" / f"{i}.mp4", 8.0)
    started = threading.Barrier(4, timeout=WAIT)

    def encode(i: int):
        def work(publish):
            started.wait()  # all four encoders are inside their work at once
            write_video(video(i), tmp_path / "parallel" / f"{i}.mp4", 8.0)

        return work

    with Writers(lambda row: None, workers=4, pending=4) as writers:
        for i in range(4):
            writers.submit(encode(i))
    assert digests(tmp_path / "parallel") == digests(tmp_path / "serial")


def test_rows_are_published_in_the_order_handed_over_whichever_encoder_finishes_first():
    published: list[int] = []
    gates = [threading.Event() for _ in range(5)]
    finished = threading.Semaphore(0)

    def work(i: int):
        def run(publish):
            assert gates[i].wait(WAIT)
            publish(i)
            finished.release()

        return run

    writers = Writers(published.append, workers=5, pending=5)
    for i in range(5):
        writers.submit(work(i))
    for i in (4, 2, 3, 1):  # the later rows finish first: none may be published before row 0
        gates[i].set()
        assert finished.acquire(timeout=WAIT)
    with writers._lock:  # the pool publishes under this lock: nothing is half done while it is held
        assert published == []
    gates[0].set()
    writers.close()
    assert published == [0, 1, 2, 3, 4]


def test_a_full_pool_holds_the_next_row_back_until_an_encoder_is_free():
    """At most workers + 1 videos' frames are held: the hand-over waits for a work to end (and says
    how long it waited)."""
    gate = threading.Event()
    happened: list[str] = []  # list.append is atomic: the order things happened in
    writers = Writers(lambda row: None, workers=2)
    assert writers.limit == 3

    def work(publish) -> None:
        gate.wait(WAIT)
        happened.append("a work ended")

    for _ in range(3):
        writers.wait_for_room()
        writers.submit(work)
    waited: list[float] = []

    def hand_over() -> None:
        waited.append(writers.wait_for_room())
        happened.append("the fourth let in")

    handed_over = threading.Thread(target=hand_over)
    handed_over.start()
    handed_over.join(0.2)
    assert handed_over.is_alive() and not waited, "a fourth video was let in while three were held"
    gate.set()
    handed_over.join(WAIT)
    assert happened.index("a work ended") < happened.index("the fourth let in")
    assert waited and waited[0] > 0
    writers.close()


def test_a_failed_work_is_raised_once_its_turn_comes_and_the_other_rows_are_still_published_once():
    published: list[int] = []

    def work(i: int):
        def run(publish):
            if i == 1:
                raise OSError(28, "No space left on device")
            publish(i)

        return run

    writers = Writers(published.append, workers=2)
    for i in range(4):
        writers.submit(work(i))
    with pytest.raises(OSError, match="No space left"):
        writers.close()
    assert published == [0, 2, 3]


def test_an_error_in_the_loop_that_makes_videos_still_finishes_and_publishes_the_videos_handed_over():
    published: list[int] = []
    with pytest.raises(KeyError), Writers(published.append, workers=2) as writers:
        for i in range(3):
            writers.submit(lambda publish, i=i: publish(i))
        raise KeyError("the model failed")
    assert published == [0, 1, 2]


def test_encoders_are_the_processes_share_of_the_cpus_it_may_use_capped_by_the_container_quota(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert encoder_count(1, quota) == 64 and encoder_count(8, quota) == 8 and encoder_count(128, quota) == 1
    quota.write_text("1600000 100000\n")  # 16 CPUs' worth of time
    assert encoder_count(1, quota) == 16 and encoder_count(4, quota) == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3, 4, 5})  # pinned: its own share already
    assert encoder_count(8, tmp_path / "none") == 3
