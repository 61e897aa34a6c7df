"""The output folder: the run's own, one run at a time, never shrunk by ids=, and a full or
read-only folder ends the run with one sentence saying what was kept.

Lock tests hold the lock from a helper process (a "running run") that the test kills with SIGKILL,
as a crash would. Full and read-only folders are simulated by raising the OSError the kernel would
(ENOSPC, EROFS) at the write: tests run as root, where chmod cannot make a folder read-only, and a
read-only mount needs privileges CI does not have. A path that cannot be a folder is real.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from batch_runner.errors import UserError
from batch_runner.outputs.storage import (
    LOCK_FILE,
    MARKER_FILE,
    STALE_AFTER_S,
    OutputError,
    OutputLock,
    check_output_dir,
    mark_output_dir,
)
from batch_runner.run import runner
from batch_runner.run.logs import log_to_file
from tests.conftest import ROOT, photo, run_cli, run_config, write_manifest


def rows(folder: Path, ids: list[str]) -> list[dict]:
    return [
        {"id": i, "image": str(photo(folder / f"{i}.png", seed=n)), "prompt": f"a boat {n}"} for n, i in enumerate(ids)
    ]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- whose folder ---------------------------------------------------------------------------------


def test_a_folder_holding_the_manifest_is_refused_and_nothing_in_it_changes(tmp_path: Path) -> None:
    # The reported case: output_dir set to the dataset's own folder, with its own metadata.parquet
    # and config.yaml, which a run overwrote.
    data = tmp_path / "data"
    manifest = write_manifest(data / "jobs.csv", rows(data, ["a"]))
    (data / "config.yaml").write_text("mine: true\n")
    pd.DataFrame({"file_name": ["a.png"], "label": [1]}).to_parquet(data / "metadata.parquet")
    before = snapshot(data)

    # In-process: the refusal is a UserError, which the command line ends with exit 2 (its way there
    # is tested once, in test_an_output_dir_that_cannot_be_a_folder_is_one_sentence_and_exit_2).
    with pytest.raises(OutputError) as refused:
        runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={data}"))
    line = str(refused.value)
    assert "\n" not in line and "holds the manifest" in line and "pick an output_dir of its own" in line
    assert snapshot(data) == before


def test_a_folder_of_other_files_is_refused_an_empty_or_new_one_is_fine(tmp_path: Path) -> None:
    manifest = tmp_path / "data" / "jobs.csv"
    project = tmp_path / "project"  # output_dir=. in a project's root
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("mine")
    with pytest.raises(OutputError, match=r"already holds files batch_runner did not write \('README.md', 'src'\)"):
        check_output_dir(project, manifest)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output_dir(empty, manifest)
    check_output_dir(tmp_path / "not" / "yet", manifest)
    # A run's own folder (marked) may hold the user's notes too.
    mark_output_dir(project)
    check_output_dir(project, manifest)


def test_a_folder_of_an_earlier_runner_version_is_adopted_only_with_its_results_log(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.csv"
    old = tmp_path / "old"
    (old / "parts").mkdir(parents=True)
    (old / "videos").mkdir()
    (old / "config.yaml").write_text("manifest: x\n")
    (old / "results.parquet").write_bytes(b"")
    (old / ".results.parquet.77.partial").write_bytes(b"")
    with pytest.raises(OutputError, match="no results log"):
        check_output_dir(old, manifest)  # config.yaml and videos/ alone could be anyone's
    (old / "parts" / "20240101T000000000000Z.rank00000.jsonl").write_text("{}\n")
    check_output_dir(old, manifest)


# --- one run at a time ----------------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from batch_runner.outputs.storage import OutputLock
lock = OutputLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(out: Path) -> subprocess.Popen:
    """A process that holds output_dir's lock as a running run's main process does."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_held_lock_refuses_naming_its_holder_and_a_killed_holders_lock_is_taken_over(tmp_path: Path, caplog) -> None:
    out = tmp_path / "out"
    OutputLock(out).refuse_if_held()  # no lock file: free
    holder = hold_lock(out)
    try:
        for ask in (OutputLock(out).acquire, OutputLock(out).refuse_if_held):  # the launcher asks without taking it
            with pytest.raises(OutputError) as caught:
                ask()
            message = str(caught.value)
            assert f"is in use by another run (pid {holder.pid} on host " in message
            assert "\n" not in message
    finally:
        kill(holder)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by the kill
    OutputLock(out).refuse_if_held()  # its holder is gone
    with OutputLock(out) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert "taking over the lock of a run that no longer runs" in caplog.text
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_another_hosts_lock_holds_while_fresh_and_is_stale_once_old(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"host": "node7", "host_id": "node7-boot", "pid": 1, "started": "earlier"}))
    with pytest.raises(OutputError, match="pid 1 on host node7"):
        OutputLock(out).acquire()
    with pytest.raises(OutputError, match="pid 1 on host node7"):
        OutputLock(out).refuse_if_held()
    old = time.time() - STALE_AFTER_S - 1
    os.utime(lock, (old, old))
    OutputLock(out).refuse_if_held()
    OutputLock(out).acquire().release()


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_is_refused_and_runs_once_the_first_is_gone(tmp_path: Path, caplog) -> None:
    manifest = write_manifest(tmp_path / "jobs.csv", rows(tmp_path / "in", ["a", "b"]))
    out = tmp_path / "out"
    mark_output_dir(out)
    running = hold_lock(out)
    cfg = run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}")
    try:  # in-process runs: the command line's exit 2 for a refused folder is tested once, below
        with pytest.raises(OutputError) as busy:
            runner.run(cfg)
    finally:
        kill(running)
    line = str(busy.value)
    assert "\n" not in line and f"is in use by another run (pid {running.pid} on host" in line
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE, LOCK_FILE]  # nothing written

    assert runner.run(cfg) == 0
    assert "taking over the lock" in caplog.text
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["a.mp4", "b.mp4"]
    assert not (out / LOCK_FILE).exists()


# --- ids= never shrinks -----------------------------------------------------------------------------


@pytest.mark.slow
def test_ids_on_an_existing_run_keep_every_other_row(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "jobs.csv", rows(tmp_path / "in", ["a", "b", "c"]))
    out = tmp_path / "out"
    # The runs around the from_run one go in-process: only from_run's replay is the command line's own.
    assert runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}")) == 0
    made = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}

    again = run_cli(f"from_run={out}", "ids=[b]", "overwrite=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    results = pd.read_parquet(out / "results.parquet")
    assert list(results["id"]) == ["a", "b", "c"] and set(results["status"]) == {"ok"}
    assert sorted(pd.read_parquet(out / "metadata.parquet")["file_name"]) == [f"videos/{i}.mp4" for i in "abc"]
    assert json.loads((out / "report.json").read_text())["rows"] == 3
    after = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    assert after["b.mp4"] != made["b.mp4"] and {k: after[k] for k in ("a.mp4", "c.mp4")} == {
        k: made[k] for k in ("a.mp4", "c.mp4")
    }

    assert runner.run(run_config(f"manifest={manifest}", "model=tiny", "ids=[c]", f"output_dir={out}")) == 0
    assert list(pd.read_parquet(out / "results.parquet")["id"]) == ["a", "b", "c"]
    assert len(pd.read_parquet(out / "metadata.parquet")) == 3
    # The folder's config still replays every row (from_run=out), not only the last selection.
    assert OmegaConf.load(out / "config.yaml").ids is None


# --- a folder that cannot be written ----------------------------------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
def test_a_full_disk_while_making_videos_ends_in_one_sentence_and_keeps_finished_rows(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "jobs.csv", rows(tmp_path / "in", ["a", "b", "c"]))
    out = tmp_path / "out"
    real = runner.write_video
    # b's video is written under a staged name first (.b.mp4.<pid>.staged...), then renamed into place.
    is_b = lambda path: path.name == "b.mp4" or path.name.startswith(".b.mp4.")  # noqa: E731
    monkeypatch.setattr(runner, "write_video", lambda f, path, *a: enospc() if is_b(path) else real(f, path, *a))
    cfg = run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}", "chunk_size=1", "scheduling=static")

    with pytest.raises(OutputError) as caught:
        runner.run(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"Could not write videos/b.mp4 in output_dir {str(out)!r}: No space left on device;")
    assert "every row finished so far is kept" in message and "free space there" in message
    # a was done; c may have been made while b's write failed (the writer runs behind the model).
    kept = sorted(p.name for p in (out / "videos").iterdir())
    assert "a.mp4" in kept and "b.mp4" not in kept
    recorded = [json.loads(line)["id"] for part in (out / "parts").glob("*.jsonl") for line in part.open()]
    assert sorted(recorded) == [name.removesuffix(".mp4") for name in kept]
    assert not (out / LOCK_FILE).exists()  # released on the error too

    monkeypatch.setattr(runner, "write_video", real)
    assert runner.run(cfg) == 0  # the rerun makes only the others
    assert json.loads((out / "report.json").read_text())["made_this_run"] == 3 - len(kept)


@pytest.mark.slow
def test_a_full_disk_at_the_results_table_ends_in_one_sentence(tmp_path, monkeypatch):
    from batch_runner.outputs import results

    manifest = write_manifest(tmp_path / "jobs.csv", rows(tmp_path / "in", ["a"]))
    out = tmp_path / "out"
    monkeypatch.setattr(results, "atomic_write_parquet", enospc)
    with pytest.raises(OutputError, match=r"^Could not write the results, .*No space left on device; every video made"):
        runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}"))
    assert (out / "videos" / "a.mp4").is_file() and list((out / "parts").glob("*.jsonl"))


def test_a_read_only_folder_ends_in_one_sentence_before_anything_loads(tmp_path, monkeypatch):
    manifest = write_manifest(tmp_path / "jobs.csv", rows(tmp_path / "in", ["a"]))
    out = tmp_path / "out"

    def read_only(folder: Path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder / MARKER_FILE))

    monkeypatch.setattr(runner, "mark_output_dir", read_only)
    monkeypatch.setattr(runner, "Replica", None)  # nothing may load
    with pytest.raises(OutputError, match=r"Read-only file system .*nothing was made; pick an output_dir on a"):
        runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}"))


def test_an_output_dir_that_cannot_be_a_folder_is_one_sentence_and_exit_2(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "jobs.csv", rows(tmp_path / "in", ["a"]))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_cli(f"manifest={manifest}", "model=tiny", f"output_dir={blocker}/out", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "Not a directory" in line and "pass an output_dir that is a folder" in line


def test_user_error_is_what_cli_turns_into_exit_2() -> None:
    assert issubclass(OutputError, UserError)


class FullDisk:
    """A file whose disk is full: every write fails as the kernel's does."""

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        pass


def test_a_log_file_on_a_full_disk_says_so_once_not_a_traceback_per_line(tmp_path: Path, capsys) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        log_to_file(tmp_path / "logs" / "rank00001.log")
        (handler,) = set(root.handlers) - set(before)
        handler.stream = FullDisk()
        for line in ("one", "two", "three"):
            logging.getLogger("batch_runner.test").warning(line)
    finally:
        for handler in set(root.handlers) - set(before):
            root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err
    assert err.count(f"no longer logging to {tmp_path / 'logs' / 'rank00001.log'}: No space left on device") == 1


def test_a_lock_that_could_not_be_written_is_not_left_behind(tmp_path: Path, monkeypatch) -> None:
    """A run on a full disk creates its lock but cannot write its record in it: the empty lock it
    left made the advised rerun refuse the folder as someone else's."""
    out = tmp_path / "out"
    out.mkdir()

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(os, "pwrite", full)
        with pytest.raises(OSError):
            OutputLock(out).acquire()
    assert list(out.iterdir()) == []
    (out / LOCK_FILE).touch()  # as an older version left it: still a folder a run may start in
    check_output_dir(out, tmp_path / "jobs.csv")
    OutputLock(out).acquire().release()


def test_a_full_disk_message_names_no_temporary_file(tmp_path: Path) -> None:
    from batch_runner.outputs.storage import output_errors

    staged = tmp_path / "videos" / ".r3.mp4.9361.partial"
    with pytest.raises(OutputError) as refused, output_errors(tmp_path, "write videos/r3.mp4", "kept"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staged))
    assert f"{tmp_path}': No space left on device; kept;" in str(refused.value)
    with pytest.raises(OutputError) as refused, output_errors(tmp_path, "write the results", "kept"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "results.parquet"))
    assert f"No space left on device ({tmp_path / 'results.parquet'}); kept;" in str(refused.value)
