"""Nothing is written through a link (issue #26, item 3): a link planted in output_dir, where the run
writes or opens files in place, is refused by name before anything is written, and the files the run
opens in place (lock, logs, results log, start-up record) are opened with O_NOFOLLOW, so the file a
link points to, outside output_dir, is never touched."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from batch_runner.outputs.results import ResultLog, ResultRow
from batch_runner.outputs.storage import LOCK_FILE, MARKER_FILE, OutputError, OutputLock, check_output_dir
from batch_runner.run import runner, startup
from batch_runner.run.logs import log_to_file
from tests.conftest import photo, run_config, write_manifest


def victim(tmp_path: Path) -> Path:
    """A user's file outside output_dir, which a planted link points to."""
    path = tmp_path / "precious.txt"
    path.write_text("mine")
    return path


def run_folder(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / MARKER_FILE).write_text("{}")
    return out


@pytest.mark.parametrize("name", [LOCK_FILE, MARKER_FILE, "videos", "logs", "parts", "previews", "shards"])
def test_a_link_where_the_run_writes_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    out = run_folder(tmp_path)
    target = tmp_path / "elsewhere"
    target.mkdir()
    if name == "logs":
        (out / "logs").rmdir()
    if name == MARKER_FILE:
        (out / name).unlink()
    (out / name).symlink_to(target)
    with pytest.raises(OutputError) as caught:
        check_output_dir(out, tmp_path / "jobs.csv")
    message = str(caught.value)
    assert f"holds symbolic links where the run writes ({name!r})" in message and "\n" not in message
    assert list(target.iterdir()) == []


def test_links_inside_logs_and_parts_are_refused_too(tmp_path: Path) -> None:
    out = run_folder(tmp_path)
    (out / "parts").mkdir()
    (out / "logs" / "rank00001.log").symlink_to(victim(tmp_path))
    (out / "parts" / "x.rank00000.jsonl").symlink_to(victim(tmp_path))
    with pytest.raises(OutputError, match=r"\('logs/rank00001.log', 'parts/x.rank00000.jsonl'\)"):
        check_output_dir(out, tmp_path / "jobs.csv")


def test_a_run_on_a_folder_with_a_linked_videos_folder_ends_before_anything_is_written(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "jobs.csv", [{"id": "a", "image": str(photo(tmp_path / "a.png")), "prompt": "x"}]
    )
    out = run_folder(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "videos").symlink_to(elsewhere)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputError, match=r"\('videos'\)"):
        runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={out}"))
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == before


def test_the_lock_is_never_opened_through_a_link(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = victim(tmp_path)
    (out / LOCK_FILE).symlink_to(target)
    with pytest.raises(OSError) as caught:
        OutputLock(out).acquire()
    assert caught.value.errno == errno.ELOOP
    assert target.read_text() == "mine" and (out / LOCK_FILE).is_symlink()


def test_rank_logs_results_logs_and_start_up_records_never_write_through_a_link(tmp_path: Path) -> None:
    target = victim(tmp_path)
    logs = tmp_path / "out" / "logs"
    logs.mkdir(parents=True)
    (logs / "rank00001.log").symlink_to(target)
    (logs / "startup-rank00001.json").symlink_to(target)
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        with pytest.raises(OSError):
            log_to_file(logs / "rank00001.log")
            logging.getLogger("x").warning("would be appended to the target")
    finally:
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
    startup.save(logs / "startup-rank00001.json", 1)  # renamed over the link: the link is gone, not followed
    assert not (logs / "startup-rank00001.json").is_symlink()
    assert json.loads((logs / "startup-rank00001.json").read_text())["rank"] == 1
    results = ResultLog(tmp_path / "out", "run1", rank=0)
    results.path.symlink_to(target)
    with pytest.raises(OSError):
        results.append(ResultRow(id="a", status="ok"))
    assert target.read_text() == "mine"


def test_a_link_planted_at_a_temporary_name_is_replaced_not_written_through(tmp_path: Path) -> None:
    from batch_runner.outputs.storage import atomic_write_text, temp_path

    target = victim(tmp_path)
    final = tmp_path / "out" / "logs" / "startup-rank00000.json"
    final.parent.mkdir(parents=True)
    temp_path(final).symlink_to(target)  # the name is guessable: the next pid's
    atomic_write_text("{}", final)
    assert final.read_text() == "{}" and target.read_text() == "mine"
    assert not temp_path(final).exists() and not temp_path(final).is_symlink()


def test_files_opened_in_place_are_still_written_where_no_link_is(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    startup.save(logs / "s.json", 3)
    startup.save(logs / "s.json", 3)  # replaced, not appended
    assert json.loads((logs / "s.json").read_text())["rank"] == 3
    ResultLog(tmp_path, "r", 0).append(ResultRow(id="a"))
    ResultLog(tmp_path, "r", 0).append(ResultRow(id="b"))
    assert [json.loads(line)["id"] for line in ResultLog(tmp_path, "r", 0).path.read_text().splitlines()] == ["a", "b"]


def test_a_manifest_or_output_dir_that_is_a_link_loop_is_refused_in_one_sentence(tmp_path: Path) -> None:
    """Path.resolve raises RuntimeError on a loop (Python < 3.13): the run's own checks name it instead."""
    from batch_runner.errors import UserError

    manifest = write_manifest(
        tmp_path / "jobs.csv", [{"id": "a", "image": str(photo(tmp_path / "a.png")), "prompt": "x"}]
    )
    (tmp_path / "loop.csv").symlink_to(tmp_path / "loop.csv")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match=r"'.*loop\.csv' is a symbolic link that points back to itself"):
        runner.run(run_config(f"manifest={tmp_path / 'loop.csv'}", "model=tiny", f"output_dir={tmp_path / 'out'}"))
    with pytest.raises(UserError, match=r"output_dir '.*/loop'"):
        runner.run(run_config(f"manifest={manifest}", "model=tiny", f"output_dir={tmp_path / 'loop'}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
