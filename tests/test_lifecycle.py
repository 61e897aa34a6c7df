"""A run's processes stop together: killed or signalled launchers take every process along, a run
refuses processes of another run, and what a launch leaves behind is its output_dir alone."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch_runner.run import lifecycle
from tests.conftest import ROOT, accelerate_cpu, free_port, run_cli, write_manifest
from tests.test_faults import alive, good_rows, process_tree

# Tests that start processes are marked slow by tests/conftest.py.

STOP_WITHIN_SECONDS = 60  # a few seconds on an idle machine (GRACE_SECONDS at worst); slack for a loaded host


def start_slow_run(
    tmp_path: Path, port: int, env: dict | None = None, rows: int = 4
) -> tuple[subprocess.Popen, list[str], Path]:
    """A two-process run whose rows take minutes, started as a user's shell would: its own process group.

    Returns once both processes are about to make rows (their next work is the first chunk's)."""
    manifest = write_manifest(tmp_path / "jobs.csv", good_rows(tmp_path / "inputs", rows))
    args = [f"manifest={manifest}", "model=tiny", f"output_dir={tmp_path / 'out'}", "model.num_inference_steps=1000"]
    log = tmp_path / "first.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [*accelerate_cpu(2, port), str(ROOT / "run.py"), *args],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    deadline = time.time() + 240
    rank1 = tmp_path / "out" / "logs" / "rank00001.log"  # rank 1 logs below warnings to its file only
    ready = "INFO batch_runner.run.runner: writing videos with up to"
    both = False
    while not both and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        other = rank1.read_text(errors="replace") if rank1.exists() else ""
        both = f"[rank 0/2] {ready}" in log.read_text(errors="replace") and f"[rank 1/2] {ready}" in other
    assert proc.poll() is None, "the run ended before it could be stopped:\n" + log.read_text()[-3000:]
    assert both, "the processes did not start making rows within 240 s:\n" + log.read_text()[-3000:]
    return proc, args, log


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("sig", "target"),
    [(signal.SIGKILL, "group"), (signal.SIGTERM, "launcher"), (signal.SIGINT, "group")],
    ids=["kill-9-the-group", "sigterm-the-launcher", "ctrl-c"],
)
def test_a_stopped_launcher_takes_every_process_along_and_frees_its_port(tmp_path, sig, target):
    port = free_port()
    temp = tmp_path / "tmp"  # the launches' temporary folder (torchrun keeps its logs there)
    temp.mkdir()
    env = os.environ | {"TMPDIR": str(temp)}
    proc, args, log = start_slow_run(tmp_path, port, env)
    pids = process_tree(proc.pid)
    assert len(pids) >= 4, pids  # accelerate, the torchrun agent, two processes
    try:
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        left = wait_gone(pids, STOP_WITHIN_SECONDS)
        assert not left, f"still running {STOP_WITHIN_SECONDS} s after {sig.name}: {left}\n" + log.read_text()[-3000:]
    finally:
        kill_all(pids)
    out = tmp_path / "out"
    assert not list(out.rglob("*.partial"))
    # Each process stopped through its handler (not killed by the agent after its grace period). Rank 1
    # says so in its own log file. Rank 0 says so on the terminal, which a killed launcher takes along:
    # accelerate relays the processes' stderr through a pipe that dies with it.
    rank1 = (out / "logs" / "rank00001.log").read_text(errors="replace")
    assert "stopped by SIG" in rank1, rank1[-3000:]
    if sig != signal.SIGKILL:
        assert "stopped by SIG" in log.read_text(errors="replace"), log.read_text()[-3000:]

    # The next launch on the same port is a run of its own: nothing of the first one joins it.
    again = run_cli(*args[:-1], "model.num_inference_steps=2", "ids=[good0]", launcher=accelerate_cpu(2, port), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of 1 rows ok" in again.stdout, again.stdout
    # torchrun's log folders (torchelastic_*, ours batch_runner_torchrun_*), the killed launch's
    # included, do not pile up in the temporary folder; inductor's cache folder may stay.
    assert not [p.name for p in temp.iterdir() if "torchelastic" in p.name or "torchrun" in p.name], list(
        temp.iterdir()
    )


# --- who may join a run -------------------------------------------------------------------------------


def test_processes_of_different_runs_at_one_rendezvous_all_refuse(tmp_path):
    """Two processes meet at one port (as two hosts would), started for two output folders: neither runs,
    and each prints why."""
    manifest = write_manifest(tmp_path / "jobs.csv", good_rows(tmp_path / "inputs", 2))
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = os.environ | {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
        }
        command = [sys.executable, str(ROOT / "run.py"), f"manifest={manifest}", "model=tiny"]
        command.append(f"output_dir={tmp_path / f'out{rank}'}")
        procs.append(subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True))
    errors = [proc.communicate(timeout=300)[1] for proc in procs]

    assert [proc.returncode for proc in procs] == [2, 2], errors
    # Every rank says why (on two hosts each terminal is read on its own), once each.
    for text in errors:
        lines = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, text[-3000:]
        assert f"rank(s) 1 at the rendezvous 127.0.0.1:{port} were started for another run" in lines[0]
        assert "--main_process_port" in lines[0]
    assert "Traceback" not in errors[0] + errors[1]
    assert not (tmp_path / "out0").exists() and not (tmp_path / "out1").exists()


def test_a_process_of_an_earlier_launch_claims_nothing_from_a_later_one():
    from torch.distributed import HashStore

    from batch_runner.cluster.cluster import LAUNCH_KEY, SameLaunch
    from batch_runner.errors import UserError

    store = HashStore()
    store.set(LAUNCH_KEY, "first")
    claims = SameLaunch(store, "first")
    assert claims.add("claimed", 2) == 2
    store.set(LAUNCH_KEY, "second")  # a new launch on the same port now serves the store
    with pytest.raises(UserError, match="belongs to an earlier launch"):
        claims.add("claimed", 2)
    assert store.add("claimed", 0) == 2


def test_a_busy_rendezvous_port_is_named_with_the_option_to_change_it(tmp_path):
    manifest = write_manifest(tmp_path / "jobs.csv", good_rows(tmp_path / "inputs", 1))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            f"manifest={manifest}", "model=tiny", f"output_dir={tmp_path / 'out'}", launcher=accelerate_cpu(2, port)
        )
    assert result.returncode != 0
    assert f"error: The rendezvous port {port} is already in use" in result.stderr, result.stderr[-3000:]
    assert "--main_process_port" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_stop_signal_while_the_process_ends_raises_nothing_into_its_cleanup(monkeypatch):
    """accelerate's SIGTERM, sent once the other process has exited, may come while this one is
    already ending (cli's finally: uninstall): it once raised Interrupted there, a traceback after
    the run's own one-sentence error."""
    lifeline = lifecycle.Lifeline(bound_to_parent=False).install()
    real_join = lifeline._thread.join

    def join_with_a_signal(timeout=None):
        signal.raise_signal(signal.SIGTERM)  # its Python handler runs here, as it did in the join
        real_join(timeout)

    monkeypatch.setattr(lifeline._thread, "join", join_with_a_signal)
    try:
        lifeline.uninstall()  # raised Interrupted before the fix
    finally:
        if signal.getsignal(signal.SIGTERM) == lifeline._on_signal:  # it failed part-way: undo it
            monkeypatch.undo()
            lifeline.uninstall()
    assert signal.getsignal(signal.SIGTERM) != lifeline._on_signal
