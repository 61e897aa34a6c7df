"""A warm server: one process that has imported what a run imports, and forks each run from there.

Why: a run spends most of its start-up importing. On one H200 (docs/experiments/2026-12-04d), a warm
4-step Wan 2.1 run reached its first step 30 s after launch, of which about 15 s were imports
(torch, dynamo, diffusers and transformers, inductor). Those are the same for every run of a
checkout, so a server imports them once and forks a child per run, as Python's forkserver and
torch's DataLoader workers do: the child starts with every module in memory.

    python -m batch_runner.run.warm          # in a terminal of its own, or `&` in a job script

serves every `python run.py ...` (and every process of an `accelerate launch`) of this checkout,
by this user, on this host. run.py asks it before its own slow imports (`hand_over`). The server
refuses, and the run starts cold exactly as without it, printing one line why, whenever the
child could differ from a fresh process: another interpreter, its flags or sys.path roots, an
environment variable that a module may have read at import (any but the launchers' own, below),
another cgroup, namespace, resource limit or niceness it cannot take, or a module file changed since
the server imported it (then the server also stops: start it again). The child takes the run's
standard streams, working folder, environment, arguments, umask and CPU affinity, and runs run.py as
its main module; the server relays the run's stop signals to it and its exit status back. A run's
process that ends (its launcher killed it) stops its child with SIGTERM, and a stopped server stops
its children the same way: rows already made are kept, as after any stop.

CUDA must not have started in the server, or no child could use it: the server refuses to serve
when the CUDA driver library is loaded after its imports, and first forks one child that starts CUDA
(where there is a GPU) to prove it. Linux only (fork, pidfd, SCM_RIGHTS); elsewhere run.py runs cold.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOCKET_ENV = "BATCH_RUNNER_WARM_SOCKET"  # where the server listens (tests, or one server per job)
DISABLE_ENV = "BATCH_RUNNER_WARM"  # =0: never hand a run over
# Set by launchers per process, or by the shell per terminal, and read by nothing at import time: a
# run's may differ from the server's. OMP_NUM_THREADS is applied in the child (torch.set_num_threads).
LAUNCH_VARIABLES = frozenset(
    (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
        "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
        "KMP_AFFINITY", "KMP_BLOCKTIME", "CUDA_VISIBLE_DEVICES", "BATCH_RUNNER_LAUNCHER_PID",
        "PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES",
    )
)  # fmt: skip
LAUNCH_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "TORCH_NCCL_", "NCCL_", "SLURM_", "SSH_", "TMUX", "TERM")
# Modules every run imports, past what importing run.py's own modules does; `--import` adds more.
PRELOADS = (
    "torch",
    "torch._dynamo",
    "torch._inductor.compile_fx",
    "torch._inductor.codecache",
    "torch.distributed.run",
    "triton",
    "diffusers",
    "transformers",
    "accelerate",
    "pandas",
    "pyarrow.parquet",
    "av",
    "PIL.Image",
    "hydra",
    "batch_runner.run.cli",
    "batch_runner.run.runner",
)
_HEADER = struct.Struct("!I")
_forked_run = False  # True in a child the server forked


def is_forked_run() -> bool:
    """Whether this process is a run the warm server forked (run.py then neither hands over nor
    asks to die with its parent: the server is its parent and stops it when the run's process ends)."""
    return _forked_run


def socket_path() -> Path:
    """The server's socket for this checkout and user: $BATCH_RUNNER_WARM_SOCKET, or one under
    $XDG_RUNTIME_DIR (else /tmp) named by the checkout's folder."""
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    checkout = str(Path(__file__).resolve().parents[2])
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"batch_runner-{os.getuid()}"
    return base / f"warm-{hashlib.sha1(checkout.encode()).hexdigest()[:12]}.sock"


# ---------------------------------------------------------------- what a run must share with the server


def process_facts() -> dict[str, Any]:
    """What a forked child would inherit from the server instead of taking from the run: the two
    must be equal (`differences`)."""
    facts: dict[str, Any] = {
        "interpreter": sys.executable,
        "prefix": sys.prefix,
        "flags": list(sys.flags),
        "xoptions": {k: str(v) for k, v in sorted(sys._xoptions.items())},
        "warnoptions": list(sys.warnoptions),
        "uid": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
    }
    for name in ("cgroup", "limits"):
        with contextlib.suppress(OSError):
            facts[name] = Path(f"/proc/self/{name}").read_text()
    for ns in ("mnt", "pid", "net", "user", "ipc", "uts"):
        with contextlib.suppress(OSError):
            facts[f"namespace {ns}"] = os.stat(f"/proc/self/ns/{ns}").st_ino
    return facts


def launch_variable(name: str) -> bool:
    return name in LAUNCH_VARIABLES or name.startswith(LAUNCH_PREFIXES)


def differences(server: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """Why a run of these facts and environment cannot be forked from this server: phrases, first
    the facts, then the environment variables (by name) that differ."""
    found = [name for name in server["facts"] if server["facts"][name] != run["facts"].get(name)]
    env_server, env_run = server["env"], run["env"]
    names = sorted(set(env_server) | set(env_run))
    set_by_imports = server.get("import_env", {})  # a run started by a run (torchrun's workers) has them
    found += [
        f"${name}"
        for name in names
        if not launch_variable(name)
        and env_run.get(name) not in (env_server.get(name), set_by_imports.get(name, env_server.get(name)))
    ]
    if run.get("nice", 0) < server.get("nice", 0):
        found.append("niceness (the run's is lower)")
    return found


# ---------------------------------------------------------------- the run's side (run.py)


def hand_over(script: str) -> int | None:
    """Have the warm server run this command; its exit status, or None to run it here (no server,
    or one that refused: then one line on stderr says why)."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not hasattr(socket, "send_fds") or not hasattr(os, "pidfd_open"):
        return None
    path = socket_path()
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:  # a server that is gone left its socket
        conn.close()
        return None
    with conn:
        if peer_uid(conn) != os.getuid():  # never hand this run's streams and environment to another user
            return None
        from batch_runner.run import lifecycle, startup

        process_start, interpreter = startup.own_start()
        umask = os.umask(0)
        os.umask(umask)
        request = {
            "argv": [str(script), *sys.argv[1:]],
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "path": sys.path,
            "facts": process_facts(),
            "umask": umask,
            "nice": os.nice(0),
            "affinity": sorted(os.sched_getaffinity(0)),
            "parent": os.getppid(),
            "process_start": process_start,
            "interpreter": interpreter,
        }
        # From here each stop signal goes to the server, which passes it to the child (one that came
        # before the fork waits in the socket for it); a refused run takes its signals back.
        got: list[int] = []

        def forward(signum: int, frame: Any) -> None:
            got.append(signum)
            with contextlib.suppress(OSError):
                conn.sendall(bytes([signum]))

        previous = {sig: signal.signal(sig, forward) for sig in lifecycle.STOP_SIGNALS}
        send(conn, request, fds=[0, 1, 2])
        reply = receive(conn)
        if reply is None or "refused" in reply:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            why = reply["refused"] if reply else "the warm server closed the connection"
            print(f"batch_runner: the warm server was not used ({why}); starting cold.", file=sys.stderr)
            for signum in got:
                signal.raise_signal(signum)
            return None
        finished = receive(conn)
    if finished is None:
        print("batch_runner: the warm server ended before the run did.", file=sys.stderr)
        return 1
    return int(finished["exit"])


def peer_uid(conn: socket.socket) -> int:
    """The user of the process at the other end of a Unix socket (SO_PEERCRED: pid, uid, gid)."""
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]


def send(conn: socket.socket, message: Mapping[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(conn, [payload], fds)
        payload = payload[sent:]
    conn.sendall(payload)


def receive(conn: socket.socket, fds: list[int] | None = None) -> dict[str, Any] | None:
    """One message (None at end of stream); the descriptors sent with it are appended to `fds`."""
    head = b""
    while len(head) < _HEADER.size:
        if fds is not None and not head:
            chunk, received, _, _ = socket.recv_fds(conn, _HEADER.size, 8)
            fds.extend(received)
        else:
            chunk = conn.recv(_HEADER.size - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = _HEADER.unpack(head)
    data = b""
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


# ---------------------------------------------------------------- the server


@dataclass
class Run:
    """One run the server forked: its child, its pidfd, and the connection to the run's process."""

    pid: int
    pidfd: int
    conn: socket.socket
    started: float = field(default_factory=time.monotonic)
    stopped: bool = False


class Server:
    def __init__(self, path: Path, extra_imports: list[str]) -> None:
        self.path = path
        self.extra_imports = extra_imports
        self.runs: dict[int, Run] = {}  # by pidfd
        self.files: dict[str, tuple[int, int]] = {}
        self.me: dict[str, Any] = {}
        self.listener: socket.socket | None = None
        self.inode = 0
        self.threads = 1
        self.import_env: dict[str, str] = {}
        # A stop signal's number is written here (signal.set_wakeup_fd), so that select() returns to
        # the loop, which then sees the listener gone.
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)

    # -- start

    def warm_up(self) -> float:
        """Import what runs import; seconds taken."""
        import importlib

        began = time.monotonic()
        before = dict(os.environ)  # as a fresh process of this environment starts
        self.me = {"facts": process_facts(), "env": before, "nice": os.nice(0)}
        for name in PRELOADS + tuple(self.extra_imports):
            try:
                importlib.import_module(name)
            except ImportError:
                if name in self.extra_imports:
                    raise
        from batch_runner.families import FAMILY_MODULES, family_named

        for family in FAMILY_MODULES:  # each family's pipeline module, and the models it imports
            with contextlib.suppress(Exception):
                family_named(family).pipeline_class  # noqa: B018  reading it imports it
        import torch

        self.threads = torch.get_num_threads()
        self.files = module_files()
        # What the imports set (inductor sets TORCHINDUCTOR_CACHE_DIR): a fresh run's imports would too.
        self.import_env = {k: v for k, v in os.environ.items() if before.get(k) != v}
        self.me["import_env"] = self.import_env
        return time.monotonic() - began

    def cuda_problem(self) -> str | None:
        """Why a forked child could not use CUDA, or None: the driver must not be loaded here, and a
        child that starts CUDA (where a GPU is) must succeed."""
        maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
        if "libcuda.so" in maps:
            return "the CUDA driver was loaded while importing (a module asked for a GPU at import)"
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                import torch

                if torch.cuda.is_available():
                    torch.zeros(1, device="cuda").add_(1).item()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        return None if os.waitstatus_to_exitcode(status) == 0 else "a forked child could not start CUDA"

    def listen(self) -> None:
        """Listen at self.path, put in place atomically (a run sees no socket or a ready server)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        staging.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(staging))
        os.chmod(staging, 0o600)
        listener.listen(64)
        self.inode = os.stat(staging).st_ino
        os.replace(staging, self.path)
        self.listener = listener

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
        import selectors

        assert self.listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self.wakeup_r, selectors.EVENT_READ, "wakeup")
        self._selector = sel
        previous = signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        try:
            while self.listener is not None or self.runs:
                for key, _ in sel.select():
                    if key.data == "wakeup":
                        os.read(self.wakeup_r, 64)
                    elif key.data == "accept" and self.listener is not None:
                        self._accept(sel)
                    elif isinstance(key.data, tuple) and key.data[0] == "conn":
                        self._from_run(sel, key.data[1])
                    elif isinstance(key.data, tuple) and key.data[0] == "exit":
                        self._reap(sel, key.data[1])
        finally:
            signal.set_wakeup_fd(previous)
            self.stop_runs()

    def stop_runs(self) -> None:
        for run in list(self.runs.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGTERM)

    def stop_listening(self) -> None:
        if self.listener is not None:
            self._selector.unregister(self.listener)
            self.close()

    def _accept(self, sel: Any) -> None:
        import selectors

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
        self.runs[pidfd] = run
        sel.register(conn, selectors.EVENT_READ, ("conn", pidfd))
        sel.register(pidfd, selectors.EVENT_READ, ("exit", pidfd))
        send(conn, {"pid": pid})
        say(f"run {pid}: {' '.join(request['argv'][1:])[:200]}")

    def _refusal(self, conn: socket.socket, request: dict[str, Any] | None, fds: list[int]) -> str | None:
        if request is None or len(fds) != 3:
            return "it sent no request"
        if peer_uid(conn) != os.getuid():
            return "another user's run"
        changed = changed_files(self.files)
        if changed:
            self.stop_listening()  # its modules are stale: every later run would be refused too
            say(f"{changed[0]} changed since this server imported it; stopping (start it again)")
            return f"{changed[0]} changed since the server started: start it again"
        found = differences(self.me, request)
        if found:
            return f"{', '.join(found[:3])} differ{'s' if len(found) == 1 else ''} from the server's"
        return None

    def _fork(self, request: dict[str, Any], fds: list[int], conn: socket.socket) -> int:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        server_pid = os.getpid()
        pid = os.fork()
        if pid:
            return pid
        try:  # the child: from here on it must never return into the server's loop
            self._leave_server(conn)
            code = become_run(request, fds, server_pid, self.threads, self.import_env)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except KeyboardInterrupt:  # Ctrl-C before the run's own handlers: as Python's own exit from it
            code = 128 + signal.SIGINT
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    def _leave_server(self, conn: socket.socket) -> None:
        """In a fresh child: default signal handlers, and none of the server's descriptors."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
        signal.set_wakeup_fd(-1)
        self._selector.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        if self.listener is not None:
            self.listener.close()
        for run in self.runs.values():
            run.conn.close()
            os.close(run.pidfd)
        conn.close()

    def _from_run(self, sel: Any, pidfd: int) -> None:
        run = self.runs[pidfd]
        try:
            data = run.conn.recv(64)
        except OSError:
            data = b""
        if data:  # stop signals the run's process got
            for signum in data:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run.pid, signum)
            return
        sel.unregister(run.conn)  # the run's process is gone (its launcher killed it): stop the child
        if not run.stopped:
            run.stopped = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGTERM)

    def _reap(self, sel: Any, pidfd: int) -> None:
        run = self.runs.pop(pidfd)
        _, status = os.waitpid(run.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        code = code if code >= 0 else 128 - code
        sel.unregister(pidfd)
        os.close(pidfd)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(run.conn)
        with contextlib.suppress(OSError):
            send(run.conn, {"exit": code})
        run.conn.close()
        say(f"run {run.pid}: exit {code} after {time.monotonic() - run.started:.1f} s")


def become_run(
    request: Mapping[str, Any], fds: list[int], server_pid: int, server_threads: int, import_env: Mapping[str, str]
) -> int:
    """In the forked child: take over the run's process (streams, folder, environment, arguments,
    start-up marks) and run run.py as __main__; its exit status. `import_env`: the variables the
    server's imports set, as the run's own imports would have."""
    global _forked_run
    _forked_run = True
    from batch_runner.run import lifecycle

    if not lifecycle.die_with(server_pid):  # the server stops its children when it ends
        return 128 + signal.SIGTERM
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.update(import_env)
    os.umask(request["umask"])
    nice = request["nice"] - os.nice(0)
    if nice > 0:
        os.nice(nice)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, request["affinity"])
    sys.argv = list(request["argv"])
    sys.path[:] = request["path"]
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # type: ignore[union-attr]
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else server_threads)
    from batch_runner.run import startup

    startup.adopt(request["process_start"], request["interpreter"])
    lifecycle.adopt_parent(request["parent"])
    import runpy

    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


def module_files() -> dict[str, tuple[int, int]]:
    """Every imported module's file, with its modification time and size, as imported."""
    files: dict[str, tuple[int, int]] = {}
    for module in list(sys.modules.values()):
        name = getattr(module, "__file__", None)
        if name and name not in files:
            with contextlib.suppress(OSError):
                info = os.stat(name)
                files[name] = (info.st_mtime_ns, info.st_size)
    return files


def changed_files(files: Mapping[str, tuple[int, int]]) -> list[str]:
    """The files of `module_files()` that changed (or went) since."""
    changed = []
    for name, (mtime, size) in files.items():
        try:
            info = os.stat(name)
        except OSError:
            changed.append(name)
            continue
        if (info.st_mtime_ns, info.st_size) != (mtime, size):
            changed.append(name)
    return changed


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} warm server: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m batch_runner.run.warm", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="also import MODULE before serving (e.g. flash_attn.cute); repeatable",
    )
    args = parser.parse_args(argv)
    path = socket_path()
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(path))
        print(f"error: a warm server already serves this checkout at {path}.", file=sys.stderr)
        return 2
    server = Server(path, args.imports)
    try:
        seconds = server.warm_up()
    except ImportError as e:
        print(f"error: --import {e.name or ''}: {e}", file=sys.stderr)
        return 2
    problem = server.cuda_problem()
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
    server.listen()
    say(f"ready at {path}: imports took {seconds:.1f} s; `python run.py ...` of this checkout starts here")
    try:
        server.serve()
    finally:
        server.close()
    return 128 + stop["signal"] if stop["signal"] else 0


if __name__ == "__main__":  # `python -m`: serve from the importable module, the one run.py asks (is_forked_run)
    from batch_runner.run import warm

    sys.exit(warm.main())
