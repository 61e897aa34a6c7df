"""The warm server (batch_runner/run/warm.py): runs forked from a process whose imports are done.

The slow tests start a real server on a socket of their own and run the command line through it as a
user does (`python run.py`, `accelerate launch --cpu`), against the same command run cold.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch_runner.replica.compile_cache import FA4_DIR, FA4_ENABLED
from batch_runner.run import lifecycle, startup, warm
from batch_runner.run.warm import preload, protocol, sameness
from batch_runner.run.warm.preload import WHILE_IMPORTING
from tests.conftest import ROOT, accelerate_cpu, run_cli

EXAMPLES = ROOT / "examples" / "jobs.csv"
SLOW_ROWS = ("model.num_inference_steps=1000",)  # about 3 s a row on one core: time to stop a run mid-way


# ------------------------------------------------------------------------------------------ in-process

names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=12)
values = st.text(min_size=0, max_size=8)
launch_names = st.sampled_from(sorted(sameness.LAUNCH_VARIABLES))


def server_view(env: dict[str, str], **facts: object) -> dict:
    return {"facts": {"interpreter": "/py", **facts}, "env": env, "nice": 0}


@given(env=st.dictionaries(names, values), launch=st.dictionaries(launch_names, values))
def test_what_launchers_set_never_keeps_a_run_from_the_server(env, launch) -> None:
    server = server_view({k: v for k, v in env.items() if not sameness.launch_variable(k)})
    run = server_view({**server["env"], **launch, "TORCHELASTIC_RUN_ID": "x", "ACCELERATE_USE_CPU": "true"})
    assert sameness.differences(server, run) == []


@given(env=st.dictionaries(names, values), name=names, value=values)
def test_any_other_variable_that_differs_is_named(env, name, value) -> None:
    server = server_view(env)
    run = server_view({**env, name: value})
    expected = [] if sameness.launch_variable(name) or env.get(name) == value else [f"${name}"]
    assert sameness.differences(server, run) == expected


def test_a_thread_count_the_run_sets_is_applied_but_one_only_the_server_set_is_not_guessed_away() -> None:
    server = server_view({"OMP_NUM_THREADS": "4"})
    assert sameness.differences(server, server_view({"OMP_NUM_THREADS": "1"})) == []
    assert sameness.differences(server, server_view({})) == ["$OMP_NUM_THREADS (the server's is set, the run's is not)"]
    assert sameness.differences(server_view({}), server_view({"OMP_NUM_THREADS": "1"})) == []


def test_facts_a_child_would_inherit_from_the_server_must_be_the_runs() -> None:
    server = server_view({}, cgroup="0::/a", flags=[0, 0])
    assert sameness.differences(server, server_view({}, cgroup="0::/b", flags=[0, 0])) == ["cgroup"]
    assert sameness.differences(server, server_view({}, cgroup="0::/a", flags=[1, 0])) == ["flags"]
    assert sameness.differences(server, server | {"nice": -1}) == ["niceness (the run's is lower)"]
    assert sameness.differences(server, server | {"nice": 5}) == []  # the child raises its own


def test_the_projects_own_switch_and_a_second_login_keep_a_run_warm() -> None:
    run = server_view({warm.DISABLE_ENV: "1", warm.SOCKET_ENV: "/tmp/w.sock", "XDG_SESSION_ID": "7", "STY": "1.pts"})
    assert sameness.differences(server_view({"XDG_SESSION_ID": "3"}), run) == []


def test_a_run_of_another_checkout_is_named() -> None:
    server = server_view({}, checkout="/srv/a")
    assert sameness.differences(server, server_view({}, checkout="/srv/b")) == ["checkout"]
    assert sameness.process_facts()["checkout"] == str(ROOT)


def test_this_processs_facts_are_its_own() -> None:
    facts = sameness.process_facts()
    assert facts["interpreter"] == sys.executable and facts["flags"] == list(sys.flags)
    assert sameness.differences({"facts": facts, "env": {}}, {"facts": sameness.process_facts(), "env": {}}) == []


def test_messages_and_the_runs_streams_cross_the_socket_whole() -> None:
    a, b = socket.socketpair()
    read, write = os.pipe()
    big = {"env": {f"V{i}": "x" * 100 for i in range(3000)}}  # larger than one read of the socket
    sender = threading.Thread(target=protocol.send, args=(a, big, [write]))
    sender.start()
    fds: list[int] = []
    assert protocol.receive(b, fds) == big
    sender.join()
    assert len(fds) == 1
    os.write(fds[0], b"through the passed descriptor")
    assert os.read(read, 100) == b"through the passed descriptor"
    for fd in (read, write, *fds):
        os.close(fd)
    a.close()
    assert protocol.receive(b) is None  # the other end closed
    b.close()


def test_a_changed_or_removed_module_file_is_found(tmp_path: Path) -> None:
    kept, edited, removed = (tmp_path / f"{n}.py" for n in ("kept", "edited", "removed"))
    for path in (kept, edited, removed):
        path.write_text("x = 1\n")
    files = {str(p): (os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in (kept, edited, removed)}
    edited.write_text("x = 22\n")
    removed.unlink()
    assert sameness.changed_files(files) == [str(edited), str(removed)]
    assert str(Path(sameness.__file__)) in sameness.module_files()


def test_the_socket_is_per_checkout_and_user_unless_named(monkeypatch) -> None:
    monkeypatch.delenv(warm.SOCKET_ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    default = warm.socket_path()
    assert default.parent == Path(f"/run/user/7/batch_runner-{os.getuid()}") and default.suffix == ".sock"
    monkeypatch.setenv(warm.SOCKET_ENV, "/x/y.sock")
    assert warm.socket_path() == Path("/x/y.sock")


def test_no_server_or_a_turned_off_one_leaves_the_run_here(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(warm.DISABLE_ENV, "1")
    monkeypatch.setenv(warm.SOCKET_ENV, str(tmp_path / "none.sock"))
    assert warm.hand_over(str(ROOT / "run.py")) is None  # no socket
    (tmp_path / "none.sock").touch()
    assert warm.hand_over(str(ROOT / "run.py")) is None  # a file no server listens on
    monkeypatch.setenv(warm.DISABLE_ENV, "0")
    assert warm.hand_over(str(ROOT / "run.py")) is None


def test_a_server_stopped_with_its_run_leaves_the_command_a_stop_status_not_a_traceback(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A job's time limit signals the whole process group: the run's process relays its SIGTERM while
    the server, stopped too, closes its end with that byte unread; the kernel then resets the
    connection. (On an H200 the command printed ConnectionResetError's traceback.)"""
    import select

    path = tmp_path / "warm.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def stopped_server() -> None:
        conn, _ = listener.accept()
        fds: list[int] = []
        protocol.receive(conn, fds)
        for fd in fds:
            os.close(fd)
        protocol.send(conn, {"pid": 12345})
        select.select([conn], [], [], 60)  # the relayed signal has arrived: close without reading it
        conn.close()

    server = threading.Thread(target=stopped_server, daemon=True)
    server.start()
    monkeypatch.setenv(warm.DISABLE_ENV, "1")
    monkeypatch.setenv(warm.SOCKET_ENV, str(path))
    monkeypatch.setenv(warm.DISABLE_ENV, "1")  # the suite keeps runs cold
    handlers = {sig: signal.getsignal(sig) for sig in lifecycle.STOP_SIGNALS}
    try:
        # The signal arrives while the command waits for its run's end (after the server's pid).
        real_receive = warm.receive

        def receive_then_signal(conn, *args):
            message = real_receive(conn, *args)
            if message == {"pid": 12345}:
                signal.raise_signal(signal.SIGTERM)
            return message

        monkeypatch.setattr(warm, "receive", receive_then_signal)
        code = warm.hand_over(str(ROOT / "run.py"))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        listener.close()
    server.join(timeout=60)
    assert code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM; the warm server ended with its run." in capsys.readouterr().err


def test_the_servers_log_line_to_a_pipe_nobody_reads_is_dropped_not_raised(monkeypatch) -> None:
    from batch_runner.run.warm import server

    read, write = os.pipe()
    os.close(read)  # the launcher that read the server's stderr is gone
    with open(write, "w") as gone:
        monkeypatch.setattr(sys, "stderr", gone)
        server.say("stopping (SIGTERM): 1 run(s) stopped, rows made are kept")  # no BrokenPipeError
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            gone.close()


def test_a_fix_written_before_the_failure_is_said_still_starts_the_server_again(monkeypatch, tmp_path) -> None:
    """A server started again by a change that broke the code waits for the fix. A fix written after
    its import began, even before it says it waits (a user or a test acts on that line), counts:
    the files are compared with their state from before the import. Compared with their state once
    the failure was said, such a fix went unseen and the server waited for good (seen once in a full
    run of the suite on two busy cores)."""
    from batch_runner.run.warm import server

    module = tmp_path / "report.py"
    module.write_text("def broken(:\n")

    def import_that_fails_while_the_fix_lands(self) -> float:
        self.me = {"env": dict(os.environ)}  # as warm_up's first line
        module.write_text("def fixed():\n    pass\n")
        raise SyntaxError("invalid syntax", (str(module), 1, 12, "def broken(:"))

    monkeypatch.setattr(server, "package_files", lambda: [str(module)])
    monkeypatch.setattr(server.Server, "warm_up", import_that_fails_while_the_fix_lands)
    monkeypatch.setattr(server, "start_again", lambda env: "started again")
    waits = server.changed_since

    def wait_that_sees_the_fix(files, *args):
        assert sameness.changed_files(files), "the fix went unseen: the server would wait for good"
        return waits(files, *args)

    monkeypatch.setattr(server, "changed_since", wait_that_sees_the_fix)
    monkeypatch.setenv(warm.SOCKET_ENV, str(tmp_path / "warm.sock"))
    assert server.main(["--again"]) == "started again"


def test_a_server_whose_imports_started_a_thread_serves_no_run() -> None:
    from batch_runner.run.warm.preload import unforkable

    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="left-by-an-import")
    thread.start()
    try:
        problem = unforkable() or ""  # other tests of this process may have left pools running
        assert problem.startswith("importing started threads (") and "left-by-an-import" in problem
    finally:
        release.set()
        thread.join()


def test_the_server_imports_flash_attention_4_told_the_gpus_compute_capability(monkeypatch, tmp_path) -> None:
    """Else its import starts CUDA's driver and the server cannot import it ahead (fa4.import_environment)."""
    from batch_runner.cluster import devices

    monkeypatch.delenv("QUACK_ARCH", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(devices, "nvml_compute_capabilities", lambda: {(9, 0)})
    env = preload.environment_while_importing()
    assert env["QUACK_ARCH"] == "90" and env.items() >= WHILE_IMPORTING.items() and FA4_DIR in env
    monkeypatch.setattr(devices, "nvml_compute_capabilities", set)  # no GPU, or NVML cannot tell
    assert "QUACK_ARCH" not in preload.environment_while_importing()


def test_a_forked_run_counts_its_start_up_from_the_runs_process(monkeypatch) -> None:
    monkeypatch.setattr(startup, "_started", None)
    startup.reset()
    startup.adopt(100.0, 100.5)
    startup.mark("imports")
    assert startup.own_start() == (100.0, 100.5)
    assert list(startup.marks()) == ["process_start", "interpreter", "imports"]
    startup.reset()


def test_a_forked_run_reads_its_launcher_as_its_parent(monkeypatch) -> None:
    assert lifecycle.parent_pid() == os.getppid()
    monkeypatch.setattr(lifecycle, "_adopted_parent", 4242)
    assert lifecycle.parent_pid() == 4242


# ------------------------------------------------------------------------------------------- processes


class WarmServer:
    """`python -m batch_runner.run.warm` on a socket of its own; `env` is what its runs must share.
    A thread reads its log, so that a server that hangs fails the test after HUNG_SECONDS rather than
    holding the suite."""

    HUNG_SECONDS = 300

    def __init__(self, folder: Path, *extra: str, env: dict[str, str] | None = None, checkout: Path = ROOT) -> None:
        self.path = folder / "warm.sock"
        self.env = {**(env or os.environ), warm.SOCKET_ENV: str(self.path), warm.DISABLE_ENV: "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "batch_runner.run.warm", *extra],
            cwd=checkout,
            env=self.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []  # read so far by wait_for
        self.log: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.put(line)
        self.log.put(None)

    def wait_for(self, text: str) -> str:
        """The server's next log line holding `text` (its log is read up to there)."""
        while (line := self.log.get(timeout=self.HUNG_SECONDS)) is not None:
            self.lines.append(line)
            if text in line:
                return line
        self.log.put(None)
        raise AssertionError(f"the server ended without saying {text!r}:\n{''.join(self.lines)}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self) -> int:
        code = self.process.wait(timeout=self.HUNG_SECONDS)
        while (line := self.log.get(timeout=self.HUNG_SECONDS)) is not None:
            self.lines.append(line)
        self.log.put(None)
        return code


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[WarmServer]:
    started = WarmServer(tmp_path_factory.mktemp("warm"))
    started.wait_for("ready at")
    yield started
    assert started.stop() == 128 + signal.SIGTERM


def served_pid(server: WarmServer, output_dir: Path) -> int:
    line = server.wait_for(f"output_dir={output_dir}")
    return int(line.split("run ", 1)[1].split(":", 1)[0])


def test_a_warm_run_makes_the_same_videos_as_a_cold_one(server: WarmServer, tmp_path: Path) -> None:
    cold = run_cli(f"manifest={EXAMPLES}", "model=tiny", f"output_dir={tmp_path / 'cold'}")
    assert cold.returncode == 0, cold.stderr
    warm_run = run_cli(f"manifest={EXAMPLES}", "model=tiny", f"output_dir={tmp_path / 'warm'}", env=server.env)
    assert warm_run.returncode == 0, warm_run.stderr
    assert "not used" not in warm_run.stderr and "4 of 4 rows ok" in warm_run.stdout
    pid = served_pid(server, tmp_path / "warm")
    server.wait_for(f"run {pid}: exit 0")
    marks = json.loads((tmp_path / "warm" / "logs" / "startup-rank00000.json").read_text())
    assert marks["pid"] == pid  # the run was made by the server's child, its marks from the run's launch
    assert marks["process_start"] < marks["interpreter"] < marks["first_step"]
    videos = sorted((tmp_path / "cold" / "videos").glob("*.mp4"))
    assert len(videos) == 4
    for video in videos:
        assert (tmp_path / "warm" / "videos" / video.name).read_bytes() == video.read_bytes()


def test_every_process_of_an_accelerate_launch_is_forked_warm(server: WarmServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    launcher = accelerate_cpu(2)
    done = run_cli(f"manifest={EXAMPLES}", "model=tiny", f"output_dir={out}", launcher=launcher, env=server.env)
    assert done.returncode == 0, done.stderr
    assert "not used" not in done.stderr and "4 of 4 rows ok" in done.stdout
    pids = {served_pid(server, out) for _ in range(3)}  # torchrun's agent, then its two processes
    ranks = [json.loads(p.read_text())["pid"] for p in sorted((out / "logs").glob("startup-rank*.json"))]
    assert len(ranks) == 2 and set(ranks) <= pids


def test_a_bad_manifest_is_refused_through_the_server_as_without_it(server: WarmServer, tmp_path: Path) -> None:
    done = run_cli(f"manifest={tmp_path / 'missing.csv'}", "model=tiny", f"output_dir={tmp_path / 'o'}", env=server.env)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("pass manifest=PATH to a .csv or .parquet file.")
    server.wait_for("exit 2")


def test_a_run_of_another_environment_starts_cold_and_says_why(server: WarmServer, tmp_path: Path) -> None:
    done = run_cli(
        f"manifest={EXAMPLES}", "model=tiny", f"output_dir={tmp_path}", env={**server.env, "HF_HOME": "/elsewhere"}
    )
    assert done.returncode == 0, done.stderr
    assert "the warm server was not used ($HF_HOME differs from the server's); starting cold." in done.stderr


def copy_of_the_checkout(folder: Path) -> Path:
    """run.py, batch_runner/ and conf/ in `folder`: a second checkout."""
    for name in ("batch_runner", "conf"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "run.py", folder / "run.py")
    return folder


def run_of(checkout: Path, env: dict[str, str], out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(checkout / "run.py"), f"manifest={EXAMPLES}", "model=tiny", f"output_dir={out}"]
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True)


def test_a_run_of_another_checkout_starts_cold_and_says_why(server: WarmServer, tmp_path: Path) -> None:
    """A server named by $BATCH_RUNNER_WARM_SOCKET would otherwise run its own checkout's modules
    for another checkout's run.py and conf/."""
    done = run_of(copy_of_the_checkout(tmp_path / "other_checkout"), server.env, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "the warm server was not used (checkout differs from the server's); starting cold." in done.stderr


def slow_run(server: WarmServer, out: Path) -> tuple[subprocess.Popen, int]:
    """A run through the server that makes each row slowly, and its child's pid; returned once the
    child is making rows."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), f"manifest={EXAMPLES}", "model=tiny", *SLOW_ROWS, f"output_dir={out}"],
        cwd=ROOT,
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        process_group=0,  # a job of its own, as a shell makes one: the kernel acts on its Ctrl-Z
    )
    child = served_pid(server, out)
    assert process.stderr is not None
    for line in process.stderr:  # the run's stop handlers are in place once it plans its rows
        if "rows to make" in line:
            return process, child
    raise AssertionError("the run ended before making rows")


def test_a_stop_signal_to_the_run_reaches_its_child(server: WarmServer, tmp_path: Path) -> None:
    process, _ = slow_run(server, tmp_path)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err
    assert "stopped by SIGINT: finished rows are kept" in err


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat: 'T' for a stopped process."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for_state(pid: int, stopped: bool) -> None:
    """Until `pid` is stopped (or no longer is); the server's HUNG_SECONDS at most."""
    deadline = time.monotonic() + WarmServer.HUNG_SECONDS
    while (process_state(pid) == "T") != stopped:
        assert time.monotonic() < deadline, f"process {pid} is {process_state(pid)!r}"
        time.sleep(0.05)


def test_ctrl_z_suspends_the_served_run_and_fg_continues_it(server: WarmServer, tmp_path: Path) -> None:
    """The child is the server's, not in the terminal's process group: Ctrl-Z (SIGTSTP to the
    command) must stop it too, and the shell's SIGCONT continue it, as for a run started cold."""
    process, child = slow_run(server, tmp_path)
    process.send_signal(signal.SIGTSTP)
    wait_for_state(process.pid, stopped=True)
    wait_for_state(child, stopped=True)
    process.send_signal(signal.SIGCONT)
    wait_for_state(process.pid, stopped=False)
    wait_for_state(child, stopped=False)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err


def test_a_run_stopped_by_ctrl_z_whose_command_is_killed_is_stopped(server: WarmServer, tmp_path: Path) -> None:
    """A stopped child holds the server's SIGTERM unread (and its folder's lock): the server
    continues it too."""
    process, child = slow_run(server, tmp_path)
    process.send_signal(signal.SIGTSTP)
    wait_for_state(child, stopped=True)
    process.kill()
    process.wait(timeout=60)
    server.wait_for(f"run {child}: exit {128 + signal.SIGTERM}")


@pytest.mark.slow  # starts a process
def test_the_server_passes_on_only_the_signals_a_run_may_send(tmp_path: Path) -> None:
    from batch_runner.run.warm.server import Run, Server

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    ours, theirs = socket.socketpair()
    server = Server(tmp_path / "warm.sock", [])
    run = Run(child.pid, os.pidfd_open(child.pid), theirs)
    try:
        ours.sendall(bytes([200, signal.SIGKILL]))  # not a signal; not one a run relays
        server._from_run(run)
        assert child.poll() is None
        ours.sendall(bytes([signal.SIGTERM]))
        server._from_run(run)
        assert child.wait(timeout=60) == -signal.SIGTERM
    finally:
        child.kill()
        os.close(run.pidfd)
        ours.close()
        theirs.close()


@pytest.mark.slow  # a thread serves a socket (no process; kept with the server tests)
def test_a_stop_signal_while_the_request_goes_out_is_relayed_after_it_not_inside_it(tmp_path, monkeypatch) -> None:
    """A signal whose byte was written while the request was being sent garbled the request: the
    server refused it and the run started cold after the server's timeout."""
    path = tmp_path / "warm.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    seen: dict = {}

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(30)  # a garbled request's length may promise more than comes
        with conn, contextlib.suppress(OSError, ValueError):
            fds: list[int] = []
            seen["request"] = protocol.receive(conn, fds)
            for fd in fds:
                os.close(fd)
            seen["then"] = conn.recv(1)
            protocol.send(conn, {"refused": "a test server"})

    threading.Thread(target=serve, daemon=True).start()
    real_send = warm.send

    def send_with_a_signal(conn, message, fds=None):
        signal.raise_signal(signal.SIGHUP)  # as if it came now: its handler must wait for the request
        real_send(conn, message, fds)

    raised: list[int] = []
    startup.mark("interpreter")  # as run.py has marked it before it hands over
    monkeypatch.setenv(warm.SOCKET_ENV, str(path))
    monkeypatch.setenv(warm.DISABLE_ENV, "1")  # the suite keeps runs cold
    monkeypatch.setattr(warm, "send", send_with_a_signal)
    previous = signal.signal(signal.SIGHUP, lambda signum, frame: raised.append(signum))
    try:
        assert warm.hand_over(str(ROOT / "run.py")) is None  # refused: run here
    finally:
        signal.signal(signal.SIGHUP, previous)
        listener.close()
    assert seen["request"]["argv"][0] == str(ROOT / "run.py")  # whole
    assert seen["then"] == bytes([signal.SIGHUP])  # relayed after it
    assert raised == [signal.SIGHUP]  # and raised again here once refused, as it came


def test_a_killed_run_process_takes_its_child_along(server: WarmServer, tmp_path: Path) -> None:
    process, _ = slow_run(server, tmp_path)
    process.kill()  # as a launcher that gives up: no signal to relay, the connection just ends
    process.wait(timeout=60)
    server.wait_for(f"exit {128 + signal.SIGTERM}")  # the child stopped as on SIGTERM


@pytest.mark.slow  # starts a server (WarmServer)
def test_a_changed_module_sends_a_run_cold_and_the_server_starts_again_with_it(tmp_path: Path) -> None:
    module = tmp_path / "mods" / "user_plugin.py"
    module.parent.mkdir()
    seen = module.with_suffix(".env")  # what the server's imports saw of the variables it sets for them
    # ... flash-attn-4's kernel cache among them: in the compile cache a run takes by default.
    while_importing = WHILE_IMPORTING | {FA4_ENABLED: "1", FA4_DIR: str(tmp_path / "compiled" / "flash_attn_cute")}
    names = sorted(while_importing)
    record = f"pathlib.Path({str(seen)!r}).write_text(repr([os.environ.get(k) for k in {names!r}]))"
    module.write_text(f"import os, pathlib\n{record}\n")
    env = {**os.environ, "PYTHONPATH": str(module.parent), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compiled")}
    env = {k: v for k, v in env.items() if k not in (FA4_ENABLED, FA4_DIR)}
    started = WarmServer(tmp_path, "--import", "user_plugin", env=env)
    started.wait_for("ready at")
    assert seen.read_text() == repr([while_importing[k] for k in names])
    second = subprocess.run(
        [sys.executable, "-m", "batch_runner.run.warm"], cwd=ROOT, env=started.env, capture_output=True, text=True
    )
    assert second.returncode == 2 and "a warm server already serves this checkout" in second.stderr
    module.write_text(f"import pathlib\npathlib.Path({str(seen)!r}).write_text('the new code')\n")
    done = run_cli(f"manifest={EXAMPLES}", "model=tiny", f"output_dir={tmp_path / 'cold'}", env=started.env)
    assert done.returncode == 0, done.stderr
    assert f"({module} changed since the server started; it is starting again); starting cold." in done.stderr
    started.wait_for("changed since this server imported it; it starts again once its runs end")
    started.wait_for("ready at")  # the same process, the code imported again
    assert seen.read_text() == "the new code"
    done = run_cli(f"manifest={EXAMPLES}", "model=tiny", f"output_dir={tmp_path / 'warm'}", env=started.env)
    assert done.returncode == 0 and "not used" not in done.stderr, done.stderr
    started.wait_for(f"output_dir={tmp_path / 'warm'}")
    assert started.stop() == 128 + signal.SIGTERM and not started.path.exists()


@pytest.mark.slow  # starts a server (WarmServer)
def test_a_change_that_breaks_the_code_is_waited_on_and_its_fix_served(tmp_path: Path) -> None:
    """The server starts again after a change; where the changed code no longer imports, it says
    why and starts again once a file the failure went through changes, rather than dying."""
    checkout = copy_of_the_checkout(tmp_path / "checkout")
    module = checkout / "batch_runner" / "outputs" / "report.py"
    source = module.read_text()
    started = WarmServer(tmp_path, checkout=checkout)
    started.wait_for("ready at")
    module.write_text(source + "\ndef broken(:\n")
    assert run_of(checkout, started.env, tmp_path / "broken").returncode != 0  # cold, and broken there too
    line = started.wait_for("cannot import the changed code")
    assert "SyntaxError" in line and str(module) in line
    module.write_text(source)
    started.wait_for("starting again")
    started.wait_for("ready at")
    done = run_of(checkout, started.env, tmp_path / "fixed")
    assert done.returncode == 0 and "not used" not in done.stderr, done.stderr
    started.wait_for(f"output_dir={tmp_path / 'fixed'}")
    assert started.stop() == 128 + signal.SIGTERM


@pytest.mark.slow  # starts a server (WarmServer)
def test_a_module_that_cannot_be_imported_is_refused_at_start(tmp_path: Path) -> None:
    started = WarmServer(tmp_path, "--import", "no_such_module_here")
    assert started.wait() == 2
    assert "error: --import no_such_module_here: it is not installed." in "".join(started.lines)


@pytest.mark.slow  # starts a server (WarmServer)
def test_stopping_the_server_stops_its_runs_as_a_launcher_does(tmp_path: Path) -> None:
    started = WarmServer(tmp_path)
    started.wait_for("ready at")
    process, _ = slow_run(started, tmp_path / "out")
    assert started.stop() == 128 + signal.SIGTERM
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM: finished rows are kept" in err
    assert not started.path.exists()


@pytest.mark.slow  # starts a server (WarmServer)
def test_a_warm_run_compiles_into_the_cache_a_cold_run_would(tmp_path: Path) -> None:
    """The server's imports set TORCHINDUCTOR_CACHE_DIR to inductor's default (dynamo does, when
    imported); the child takes the run's environment, so its run still picks its own compile cache."""
    cache_home = tmp_path / "cache"
    # As a user's shell has it: this test process's own imports of dynamo may have set the variable.
    user = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    started = WarmServer(tmp_path, env={**user, "XDG_CACHE_HOME": str(cache_home)})
    started.wait_for("ready at")
    out = tmp_path / "o"
    done = run_cli(f"manifest={EXAMPLES}", "model=tiny", "speed.compile=on", f"output_dir={out}", env=started.env)
    assert done.returncode == 0, done.stderr
    assert "not used" not in done.stderr
    assert any((cache_home / "batch_runner" / "inductor").iterdir())  # compile_cache.default_cache_dir()
    assert started.stop() == 128 + signal.SIGTERM


PROBE = """
import json, sys
from batch_runner.run.warm.preload import import_if_fork_safe
results = {name: import_if_fork_safe(name) for name in sys.argv[1:]}
results["imported here"] = [name for name in sys.argv[1:] if name in sys.modules]
print(json.dumps(results))
"""


@pytest.mark.slow  # forks trial imports in a process of its own
def test_a_module_is_imported_ahead_only_where_a_trial_child_stays_forkable(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    # A copy of a real shared library under CUDA's driver's name: what the check reads is the mapping.
    libz = next(Path(p) for p in ("/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1"))
    (plugins / "libcuda.so.1").write_bytes(libz.read_bytes())
    sources = {
        "clean_plugin": "VALUE = 1\n",
        "threaded_plugin": "import threading\nthreading.Thread(target=threading.Event().wait, daemon=True).start()\n",
        # Loads the driver where there is no GPU to lose: harmless.
        "driver_plugin": f"import ctypes\nctypes.CDLL({str(plugins / 'libcuda.so.1')!r})\n",
        # Loads the driver and has a forked child find a GPU it cannot use: as if it had started CUDA.
        "cuda_plugin": f"import ctypes, torch\nctypes.CDLL({str(plugins / 'libcuda.so.1')!r})\n"
        "torch.cuda.is_available = lambda: True\n",
        "broken_plugin": "raise ValueError('no')\n",
    }
    for name, source in sources.items():
        (plugins / f"{name}.py").write_text(source)
    names = [*sources, "no_such_plugin_here"]
    env = {**os.environ, "PYTHONPATH": f"{plugins}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", PROBE, *names], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    assert results["clean_plugin"] is None
    assert results["threaded_plugin"].startswith("importing started threads (")
    assert results["driver_plugin"] is None
    assert (
        results["cuda_plugin"] == "a child forked after the imports could not use the GPU (they loaded CUDA's driver)"
    )
    assert results["broken_plugin"] == "it failed to import"
    assert results["no_such_plugin_here"] == "it is not installed"
    assert results["imported here"] == ["clean_plugin", "driver_plugin"]


@pytest.mark.slow  # starts a server (WarmServer)
def test_a_killed_server_takes_its_runs_along_and_their_commands_say_so(tmp_path: Path) -> None:
    import psutil

    started = WarmServer(tmp_path)
    started.wait_for("ready at")
    process, child = slow_run(started, tmp_path / "out")
    # Held still while the server dies, so that the command's end can be seen to wait for it: a
    # command that ended first left the child stopping with the folder's lock (a rerun was refused).
    os.kill(child, signal.SIGSTOP)
    wait_for_state(child, stopped=True)
    started.process.kill()  # no chance to stop its runs itself: the kernel's parent-death signal does
    # Nothing here continues the child: the command does, or the kernel's SIGTERM would wait unread.
    _, err = process.communicate(timeout=WarmServer.HUNG_SECONDS)
    assert process.returncode == 1 and "the warm server ended before the run did." in err
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    # The command ended after its child: the child's last line (on the same stream) comes first.
    assert err.index("stopped by SIGTERM: finished rows are kept") < err.index("the warm server ended before")


@pytest.mark.slow  # forks a child
def test_a_run_that_ends_as_its_process_relays_a_signal_is_reaped_once(tmp_path: Path) -> None:
    """Both of a run's events in one select(): its child's end first, then a byte from its process.
    The second must not reach a run already reaped (nor, its pidfd's number reused, another run)."""
    import select
    import selectors

    from batch_runner.run.warm.server import Run, Server

    server = Server(tmp_path / "s.sock", [])
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    pidfd = os.pidfd_open(pid)
    select.select([pidfd], [], [])  # the child has ended: its event is ready first
    run = Run(pid, pidfd, ours)
    server.runs[pid] = run
    server.selector.register(pidfd, selectors.EVENT_READ, ("exit", run))
    server.selector.register(ours, selectors.EVENT_READ, ("conn", run))
    theirs.sendall(bytes([0]))  # then the run's process relays a signal (0: none)
    select.select([ours], [], [])
    server.serve()  # no listener: returns once its one run is reaped
    assert protocol.receive(theirs) == {"exit": 7}
    assert server.runs == {}
    theirs.close()
