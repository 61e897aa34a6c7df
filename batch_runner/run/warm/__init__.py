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
child could differ from a fresh process (sameness.py): another checkout, interpreter or its flags, an
environment variable that a module may have read at import (any but those launchers set per
process), another cgroup, namespace, resource limit or niceness it cannot take, or a module file
changed since the server imported it (then the server starts again by itself once its runs end,
and, where the changed code does not import, once a file the failure went through changes again).
The child takes the run's standard streams, working folder, environment, arguments, umask and CPU
affinity, and runs run.py as its main module; the server relays the run's stop signals (and Ctrl-Z's
stop and continue) to it and its exit status back. A run's process that ends (its launcher killed
it) stops its child with SIGTERM, and a stopped server stops its children the same way: rows
already made are kept, as after any stop.

CUDA must not have started in the server, or no child could use the GPU: the server imports with
torch's fork-safe (NVML) CUDA check, tells FlashAttention-4's import the GPUs' compute capability
(read through NVML) that it would otherwise ask CUDA for, tries triton's and FlashAttention-4's
imports in a child first, and before serving forks a child that starts CUDA, where there is a GPU,
refusing to serve if it cannot (preload.py). Linux only (fork, pidfd, SCM_RIGHTS); elsewhere run.py runs cold.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from batch_runner.run.warm.protocol import peer_uid, receive, send
from batch_runner.run.warm.sameness import checkout, process_facts

SOCKET_ENV = "BATCH_RUNNER_WARM_SOCKET"  # where the server listens (tests, or one server per job)
DISABLE_ENV = "BATCH_RUNNER_WARM"  # =0: never hand a run over
_forked_run = False  # True in a child the server forked


def is_forked_run() -> bool:
    """Whether this process is a run the warm server forked (run.py then neither hands over nor
    asks to die with its parent: the server is its parent and stops it when the run's process ends)."""
    return _forked_run


def mark_forked_run() -> None:
    """Note that this process is a run the warm server forked (server.become_run, in the child)."""
    global _forked_run
    _forked_run = True


def socket_path() -> Path:
    """The server's socket for this checkout and user: $BATCH_RUNNER_WARM_SOCKET, or one under
    $XDG_RUNTIME_DIR (else /tmp) named by the checkout's folder."""
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    folder = str(checkout())
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"batch_runner-{os.getuid()}"
    return base / f"warm-{hashlib.sha1(folder.encode()).hexdigest()[:12]}.sock"


def this_process(script: str) -> dict[str, Any]:
    """What the server's child takes over from this process (server.become_run), and what the server
    compares with its own (`facts`, `env`, `nice`)."""
    from batch_runner.run import startup

    process_start, interpreter = startup.own_start()
    umask = os.umask(0)
    os.umask(umask)
    return {
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


def hand_over(script: str) -> int | None:
    """Have the warm server run this command; its exit status, or None to run it here (no server,
    or one that refused: then one line on stderr says why)."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not hasattr(socket, "send_fds"):
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
        from batch_runner.run import lifecycle

        request = this_process(script)
        # From here each stop signal goes to the server, which passes it to the child (one that came
        # before the fork waits in the socket for it); a refused run takes its signals back.
        got: list[int] = []

        def forward(signum: int, frame: Any) -> None:
            got.append(signum)
            relay(signum)

        def relay(signum: int) -> None:
            with contextlib.suppress(OSError):
                conn.sendall(bytes([signum]))

        def suspend(signum: int, frame: Any) -> None:
            """Ctrl-Z: the child is the server's, outside the terminal's process group, so it is
            stopped by name, then this process as the terminal meant; `fg` continues both (resume)."""
            relay(signal.SIGSTOP)
            signal.signal(signal.SIGTSTP, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT...
            signal.signal(signal.SIGTSTP, suspend)
            # ... or not at all, where the kernel drops a terminal stop (an orphaned process group:
            # setsid, nohup after its shell ended): either way the child goes on with this process.
            relay(signal.SIGCONT)

        handlers = {sig: forward for sig in lifecycle.STOP_SIGNALS}
        handlers |= {signal.SIGTSTP: suspend, signal.SIGCONT: lambda signum, frame: relay(signal.SIGCONT)}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        # Held back while the request goes out: a relayed byte written into the middle of it (or
        # ahead of it) would garble it; they are relayed once it is whole.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, handlers)
        try:
            send(conn, request, fds=[0, 1, 2])
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        reply = receive(conn)
        if reply is None or "refused" in reply:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            why = reply["refused"] if reply else "the warm server closed the connection"
            print(f"batch_runner: the warm server was not used ({why}); starting cold.", file=sys.stderr)
            for signum in got:
                signal.raise_signal(signum)
            return None
        try:
            finished = receive(conn)
        except OSError:  # it went away with a relayed signal unread: a reset, not an end of stream
            finished = None
    if finished is None:
        # The server is gone; its child, told so by the kernel, may still be stopping (its rows
        # recorded, its lock held): this command ends after it, so that a rerun finds the folder free.
        _wait_for_end(reply.get("pid"), lifecycle.GRACE_SECONDS + 5.0)
        if got:  # a stop signal reached this process and the server alike (a job's time limit, say)
            name = signal.Signals(got[0]).name
            print(f"batch_runner: stopped by {name}; the warm server ended with its run.", file=sys.stderr)
            return 128 + got[0]
        print("batch_runner: the warm server ended before the run did.", file=sys.stderr)
        return 1
    return int(finished["exit"])


def _wait_for_end(pid: int | None, seconds: float) -> None:
    """Until process `pid` has ended, `seconds` at most (it is not this process's child to wait on)."""
    if pid is None:
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # ended already
        return
    try:
        # Stopped by Ctrl-Z when the server died, it would hold the kernel's SIGTERM unread.
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(fd, signal.SIGCONT)
        select.select([fd], [], [], seconds)
    finally:
        os.close(fd)
