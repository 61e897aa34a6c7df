"""The warm server itself (`python -m batch_runner.run.warm`): imports once, then forks a child per
run, relays the run's stop signals to it and its exit status back (see the package's docstring)."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch_runner.run import warm
from batch_runner.run.lifecycle import STOP_SIGNALS
from batch_runner.run.warm.child import become_run
from batch_runner.run.warm.preload import ImportRefused, preload, unforkable
from batch_runner.run.warm.protocol import peer_uid, receive, send
from batch_runner.run.warm.sameness import (
    changed_files,
    checkout,
    differences,
    file_state,
    module_files,
    process_facts,
)

# What a run's process may pass on to its child: its stop signals, and Ctrl-Z's stop and continue.
RELAYED = frozenset((*STOP_SIGNALS, signal.SIGSTOP, signal.SIGCONT))

# The server's log line once it listens (what a script that starts one waits for).
READY = "ready at"
NOT_AHEAD = "not imported ahead"  # a probed module left to each run, and why


@dataclass
class Run:
    """One run the server forked: its child, its pidfd, and the connection to the run's process."""

    pid: int
    pidfd: int
    conn: socket.socket
    started: float = field(default_factory=time.monotonic)
    stopped: bool = False  # sent SIGTERM because the run's process is gone
    reaped: bool = False  # its events of the same select() after this are stale: skipped


class Server:
    """The listening socket, the runs forked and still running, and what runs are compared against."""

    def __init__(self, path: Path, extra_imports: list[str]) -> None:
        self.path = path
        self.extra_imports = extra_imports
        self.runs: dict[int, Run] = {}  # by pid
        self.files: dict[str, tuple[int, int]] = {}
        self.me: dict[str, Any] = {}
        self.listener: socket.socket | None = None
        self.inode = 0
        self.threads = 1
        self.skipped: dict[str, str] = {}  # PROBED_PRELOADS not imported, and why
        self.stale = False  # a module file changed since the imports: start again, as run, once idle
        # A stop signal's number is written here (signal.set_wakeup_fd), so that select() returns to
        # the loop, which then sees the listener gone.
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "wakeup")

    # -- start

    def warm_up(self) -> float:
        """Import what runs import (preload.preload); seconds taken. Raises ImportRefused as it does."""
        began = time.monotonic()
        self.me = {"facts": process_facts(), "env": dict(os.environ), "nice": os.nice(0)}  # as a fresh run's
        self.skipped = preload(self.extra_imports)
        import torch

        self.threads = torch.get_num_threads()
        self.files = module_files()
        return time.monotonic() - began

    def listen(self) -> None:
        """Listen at self.path, put in place atomically (a run sees no socket or a ready server)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = self.path.with_name(f".warm-{os.getpid()}")  # short: a socket's path has at most 107 bytes
        staging.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(staging))
        os.chmod(staging, 0o600)
        listener.listen(64)
        self.inode = os.stat(staging).st_ino
        os.replace(staging, self.path)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ, "accept")

    def close(self) -> None:
        """Stop listening; remove the socket if it still is ours."""
        if self.listener is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:  # another server may have taken the path since
                self.path.unlink()
        self.listener.close()
        self.listener = None

    # -- serve

    def serve(self) -> None:
        """Until it stops listening and its last run ended: take runs, relay their signals, reap them."""
        previous = signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        try:
            while self.listener is not None or self.runs:
                for key, _ in self.selector.select():
                    if key.data == "wakeup":
                        os.read(self.wakeup_r, 64)
                    elif key.data == "accept":
                        if self.listener is not None:
                            self._accept()
                    elif not key.data[1].reaped:  # ("conn" | "exit", run)
                        (self._from_run if key.data[0] == "conn" else self._reap)(key.data[1])
        finally:
            signal.set_wakeup_fd(previous)
            self.stop_runs()

    def stop_runs(self) -> None:
        for run in list(self.runs.values()):
            terminate(run.pid)

    def stop_listening(self) -> None:
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.close()

    def _accept(self) -> None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        conn.settimeout(10.0)  # a run's process sends its request at once; never hang on one that does not
        fds: list[int] = []
        try:
            request = receive(conn, fds)
            refusal = self._refusal(conn, request, fds)
            if refusal is not None:
                send(conn, {"refused": refusal})
                conn.close()
                return
            assert request is not None
            pid = self._fork(request, fds, conn)
        except (OSError, ValueError) as e:
            say(f"a run's request failed: {e}")
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        conn.settimeout(None)
        pidfd = os.pidfd_open(pid)
        run = Run(pid, pidfd, conn)
        self.runs[pid] = run
        self.selector.register(conn, selectors.EVENT_READ, ("conn", run))
        self.selector.register(pidfd, selectors.EVENT_READ, ("exit", run))
        send(conn, {"pid": pid})
        say(f"run {pid}: {' '.join(request['argv'][1:])[:200]}")

    def _refusal(self, conn: socket.socket, request: dict[str, Any] | None, fds: list[int]) -> str | None:
        if request is None or len(fds) != 3:
            return "it sent no request"
        if peer_uid(conn) != os.getuid():
            return "another user's run"
        changed = changed_files(self.files)
        if changed:  # its modules are stale: every later run would be refused too
            self.stale = True
            self.stop_listening()
            say(f"{changed[0]} changed since this server imported it; it starts again once its runs end")
            return f"{changed[0]} changed since the server started; it is starting again"
        found = differences(self.me, request)
        if found:
            return f"{', '.join(found[:3])} differ{'s' if len(found) == 1 else ''} from the server's"
        return None

    def _fork(self, request: dict[str, Any], fds: list[int], conn: socket.socket) -> int:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        server_pid = os.getpid()
        # No stop signal may run the server's handler in the child (it would remove the server's
        # socket): held back over the fork, then the parent's go to the server, the child's to its
        # default handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            return pid
        try:  # the child: from here on it must never return into the server's loop
            self._leave_server(conn)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            code = become_run(request, fds, server_pid, self.threads)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except KeyboardInterrupt:  # Ctrl-C before the run's own handlers: as Python's own exit from it
            code = 128 + signal.SIGINT
        except BaseException:
            traceback.print_exc()
            code = 1
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    def _leave_server(self, conn: socket.socket) -> None:
        """In a fresh child: default signal handlers, and none of the server's descriptors."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        signal.set_wakeup_fd(-1)
        self.selector.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        if self.listener is not None:
            self.listener.close()
        for run in self.runs.values():
            run.conn.close()
            os.close(run.pidfd)
        conn.close()

    def _from_run(self, run: Run) -> None:
        try:
            data = run.conn.recv(64)
        except OSError:
            data = b""
        if data:  # stop signals the run's process got (and Ctrl-Z's stop and continue); nothing else
            for signum in data:
                if signum in RELAYED:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(run.pid, signum)
            return
        self.selector.unregister(run.conn)  # the run's process is gone (its launcher killed it): stop the child
        if not run.stopped:
            run.stopped = True
            terminate(run.pid)

    def _reap(self, run: Run) -> None:
        del self.runs[run.pid]
        run.reaped = True
        _, status = os.waitpid(run.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        code = code if code >= 0 else 128 - code
        self.selector.unregister(run.pidfd)
        os.close(run.pidfd)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(run.conn)
        with contextlib.suppress(OSError):
            send(run.conn, {"exit": code})
        run.conn.close()
        say(f"run {run.pid}: exit {code} after {time.monotonic() - run.started:.1f} s")


def say(text: str) -> None:
    """One line of the server's log. A log nobody reads any more (its launcher ended, taking the
    pipe's other end) must not end the server: a stop signal's line raised BrokenPipeError inside the
    signal handler, which left the server's loop with its runs still going."""
    with contextlib.suppress(OSError, ValueError):
        print(f"{time.strftime('%H:%M:%S')} warm server: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    summary = (warm.__doc__ or "").split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m batch_runner.run.warm", description=summary)
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="also import MODULE before serving (refused if that would leave a forked run unable to run); repeatable",
    )
    parser.add_argument("--again", action="store_true", help=argparse.SUPPRESS)  # started again after a change
    args = parser.parse_args(argv)
    path = warm.socket_path()
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(path))
        print(f"error: a warm server already serves this checkout at {path}.", file=sys.stderr)
        return 2
    # Started again after a change, the package's files as they were before the import: a fix written
    # while the import fails, or before the failure is said (a user, or a test, acts on that line),
    # is a change from these. A first start does not wait for fixes: it reads none.
    before = {name: file_state(name) for name in package_files()} if args.again else {}
    server = Server(path, args.imports)
    try:
        seconds = server.warm_up()
    except ImportRefused as e:
        print(f"error: {e}.", file=sys.stderr)
        return 2
    except Exception as e:  # the code runs need does not import as it is now (a change left it broken)
        why = f"{type(e).__name__}: {e}"
        files = files_behind(e)
        if not args.again or not files:
            print(f"error: cannot import the code runs need ({why}); fix it and start again.", file=sys.stderr)
            return 2
        # Started again by a change (main's end) that broke the code: runs start cold meanwhile (no
        # socket), and the server starts again once the fix touches a file the failure went through.
        say(f"cannot import the changed code ({why}); runs start cold until one of {', '.join(files)} changes")
        try:
            changed_since({name: before.get(name) or file_state(name) for name in files})
        except KeyboardInterrupt:  # Ctrl-C in its terminal while it waits: stopped, as when serving
            return 128 + signal.SIGINT
        return start_again(server.me["env"])
    for name, why in server.skipped.items():
        say(f"{name} {NOT_AHEAD}: {why}")
    problem = unforkable()
    if problem is not None:
        print(f"error: cannot serve runs: {problem}.", file=sys.stderr)
        return 2
    stop = {"signal": 0}

    def on_stop(signum: int, frame: Any) -> None:
        stop["signal"] = signum
        say(f"stopping ({signal.Signals(signum).name}): {len(server.runs)} run(s) stopped, rows made are kept")
        server.stop_listening()
        server.stop_runs()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_stop)
    try:
        server.listen()
    except OSError as e:
        print(f"error: cannot listen at {path}: {e}; set {warm.SOCKET_ENV} to another path.", file=sys.stderr)
        return 2
    say(f"{READY} {path}: imports took {seconds:.1f} s; `python run.py ...` of this checkout starts here")
    try:
        server.serve()
    finally:
        server.close()
    if server.stale and not stop["signal"]:  # after a `git pull` or `pip install`: import the code as it is now
        return start_again(server.me["env"])
    return 128 + stop["signal"] if stop["signal"] else 0


def terminate(pid: int) -> None:
    """SIGTERM to a run's child, continued too: one stopped by Ctrl-Z would hold it unread (and its
    output folder's lock) until something continued it."""
    for signum in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def start_again(env: dict[str, str]) -> int:
    """This server as it was started (in the environment it started with), importing the code as it
    is now; marked --again, so that code that no longer imports is waited on rather than fatal."""
    say("starting again")
    argv = sys.orig_argv if "--again" in sys.orig_argv else [*sys.orig_argv, "--again"]
    os.execve(sys.executable, argv, env)
    return 1  # not reached


def files_behind(error: BaseException) -> list[str]:
    """The source files the fix of an import failure would change: those it went through, a syntax
    error's own, the module an ImportError names, and every module file of this checkout's package
    (a fix may restore one the failure never reached)."""
    names = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
    names += [name for name in (getattr(error, "filename", None), getattr(error, "path", None)) if name]
    names += package_files()
    return sorted({name for name in names if os.path.isfile(name)})


def package_files() -> list[str]:
    """Every module file of this checkout's package."""
    return [str(path) for path in (checkout() / "batch_runner").rglob("*.py")]


def changed_since(files: dict[str, tuple[int, int]], poll_seconds: float = 1.0) -> None:
    """Until one of `files` (as `file_state` saw them) changes or goes."""
    while not changed_files(files):
        time.sleep(poll_seconds)
