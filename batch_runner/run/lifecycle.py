"""A run's processes start, stop and die together.

torchrun starts each worker in a session of its own, so a signal to the launcher's process group
(Ctrl-C, a scheduler's kill, `kill -9 -- -PGID`) never reaches the workers, and a worker whose
launcher died goes on alone. Three things close that gap:

* a process started by a launcher asks the kernel for SIGTERM when its parent dies
  (prctl PR_SET_PDEATHSIG), and a watchdog thread also stops it when its parent changes or the
  process group's store stops answering (another host's launcher or the main process is gone);
* the stop signals (TERM, INT, HUP, QUIT) raise `Interrupted` in the main thread: the row being
  made is dropped (a resume makes it), the videos already made are written and recorded, and the
  process exits with 128 + the signal's number;
* a process that cannot unwind (blocked in a collective or a store call) is ended by the watchdog
  after GRACE_SECONDS, after deleting its own temporaries.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, name)
)
GRACE_SECONDS = 10.0
POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 2.0
_PR_SET_PDEATHSIG = 1
# Set by batch_runner.run.launch in the environment of the processes it starts: their parent's pid.
LAUNCHER_PID_ENV = "BATCH_RUNNER_LAUNCHER_PID"


class Interrupted(BaseException):
    """A stop signal arrived. Not an Exception, so that no row's error handler records it as a failure."""

    def __init__(self, signum: int, why: str = "") -> None:
        self.signum = signum
        self.why = why or f"stopped by {signal.Signals(signum).name}"
        super().__init__(self.why)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def started_by_launcher() -> bool:
    """Whether torchrun or `accelerate launch` started this process (a plain `python run.py` was not)."""
    return any(name in os.environ for name in ("RANK", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", LAUNCHER_PID_ENV))


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent exits (Linux); False where it cannot.

    Exits at once when the launcher batch_runner.run.launch named is already gone (this process was
    reparented before it could ask).
    """
    parent = os.environ.get(LAUNCHER_PID_ENV)
    if not _ask_for_signal_at_parent_death(sig):
        return False
    if parent is not None and parent.isdigit() and int(parent) != os.getppid():
        sys.exit(128 + int(sig))  # the launcher died before this process could ask to die with it
    return True


def die_with(parent: int, sig: int = signal.SIGTERM) -> bool:
    """As die_with_parent, for a process whose parent is `parent` (the warm server): False when the
    kernel cannot do it, or `parent` is gone already."""
    return _ask_for_signal_at_parent_death(sig) and os.getppid() == parent


def _ask_for_signal_at_parent_death(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


_adopted_parent: int | None = None


def adopt_parent(pid: int) -> None:
    """Take `pid` as this process's parent from now on (a run the warm server forked: the parent of
    the run's process, as the launcher started it)."""
    global _adopted_parent
    _adopted_parent = pid


def parent_pid() -> int:
    """This run's parent: the one adopted, else the process's own."""
    return _adopted_parent if _adopted_parent is not None else os.getppid()


def own_temporaries(root: Path, pid: int | None = None) -> list[Path]:
    """This process's unfinished atomic writes under `root` (batch_runner.outputs.storage names them by pid)."""
    from batch_runner.outputs.storage import TEMP_SUFFIX  # here: run.py imports this module before anything slow

    return list(root.rglob(f".*.{pid or os.getpid()}{TEMP_SUFFIX}")) if root.is_dir() else []


class Lifeline:
    """Signal handlers and the watchdog of one process; `install()` it once, in the main thread."""

    def __init__(self, bound_to_parent: bool) -> None:
        self.parent = os.getppid() if bound_to_parent else None
        self.output_dir: Path | None = None
        self._store: Any = None
        self._stopping_since: float | None = None
        self._signum = signal.SIGTERM
        self._raised = False
        self._done = threading.Event()
        self._previous: dict[int, Any] = {}
        self._wakeup_r, self._wakeup_w = os.pipe()
        os.set_blocking(self._wakeup_w, False)
        self._previous_wakeup = -1
        self._thread = threading.Thread(target=self._watch, name="lifeline", daemon=True)

    def install(self) -> Lifeline:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        # The C-level handler writes each signal's number here even while the main thread is blocked
        # in C++ (a collective, a store call) and cannot run the Python handler: the watchdog sees it.
        self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        self._thread.start()
        return self

    def uninstall(self) -> None:
        # The process is ending (its error or status said already): a stop signal from here on, a
        # launcher's SIGTERM after another process exited say, is not raised into this cleanup.
        self._raised = True
        self._done.set()
        with contextlib.suppress(OSError):
            os.write(self._wakeup_w, b"\0")  # wake the watchdog from its select
        self._thread.join(timeout=2 * POLL_SECONDS)
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        for fd in (self._wakeup_r, self._wakeup_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def watch_store(self, store: Any) -> None:
        """Stop this process when the process group's store stops answering; None stops watching."""
        self._store = store

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._begin_stop(signum)
        if self._raised:  # a second signal while unwinding: the watchdog's deadline still holds
            return
        self._raised = True
        raise Interrupted(signum)

    def _begin_stop(self, signum: int) -> None:
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
            self._signum = signum

    def _stop_from_watchdog(self, why: str) -> None:
        if self._stopping_since is not None:
            return
        log.warning("%s; stopping", why)
        self._begin_stop(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread unwinds as for any stop signal

    def _watch(self) -> None:
        next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
        while not self._done.is_set():
            ready, _, _ = select.select([self._wakeup_r], [], [], POLL_SECONDS)
            if ready:
                with contextlib.suppress(OSError):
                    for byte in os.read(self._wakeup_r, 64):
                        if byte in STOP_SIGNALS:
                            self._begin_stop(byte)
            if self._done.is_set():
                return
            if self.parent is not None and os.getppid() != self.parent:
                self._stop_from_watchdog(f"the launcher (pid {self.parent}) is gone")
            store = self._store
            if store is not None and time.monotonic() >= next_heartbeat:
                next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
                try:
                    store.add("heartbeat", 0)
                except Exception as e:
                    if self._store is store and not self._done.is_set():
                        self._stop_from_watchdog(f"the run's store stopped answering ({type(e).__name__})")
            if self._stopping_since is not None and time.monotonic() - self._stopping_since > GRACE_SECONDS:
                self._hard_exit()

    def _hard_exit(self) -> None:
        """The main thread did not unwind in time: remove this process's temporaries and end it."""
        if self.output_dir is not None:
            for leftover in own_temporaries(self.output_dir):
                leftover.unlink(missing_ok=True)
        name = signal.Signals(self._signum).name
        print(f"process {os.getpid()} did not stop within {GRACE_SECONDS:.0f} s of {name}; ended it", file=sys.stderr)
        os._exit(128 + self._signum)


_current: Lifeline | None = None


def install() -> Lifeline:
    """This process's lifeline (installed once; the same one on later calls)."""
    global _current
    if _current is None:
        _current = Lifeline(bound_to_parent=started_by_launcher()).install()
    return _current


def current() -> Lifeline | None:
    return _current


def uninstall() -> None:
    global _current
    if _current is not None:
        _current.uninstall()
        _current = None


def exit_now(code: int) -> None:
    """End this process with `code` once its run has returned, without the interpreter's teardown.

    Everything the run writes is written, fsynced and closed, its threads stopped and its children
    waited for, before this is called. What is left is Python's finalization of torch, diffusers and
    transformers, about 1 s a process (measured on the 2-core CI machine), paid by every process of
    every launch: the log handlers and the standard streams are flushed, then the process ends.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
