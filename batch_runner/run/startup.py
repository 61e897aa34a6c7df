"""Where a process's time goes before its first video: a few wall-clock marks, kept per rank.

A short run on many GPUs is dominated by start-up (imports, joining the process group, weights,
compiling), and the issue that sizes it asks "from launch to each process's first denoising step".
Each process notes when it started (its age as the kernel counts it, taken from the wall clock, so
the Python interpreter and every import are counted) and when each phase ended, logs one line, and
writes the marks as unix times to output_dir/logs/startup-rank<r>.json, where a benchmark or a user
can line them up against the moment they launched the command.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# The phases in the order a process passes them; each mark is the time that phase ended.
PHASES = ("interpreter", "imports", "process_group", "replica", "first_step", "first_video")
# run.py imports this module first, so its import marks the end of the interpreter's own start-up.
_marks: dict[str, float] = {"interpreter": time.time()}
_started: float | None = None  # process_started_at, once read
_parts: dict[str, dict[str, float]] = {}  # seconds of the parts of a phase, where its owner split it


def process_started_at() -> float:
    """This process's start as a unix time: its age from /proc (Linux), taken from now; else the
    first mark. Read once: the start does not move, and every later mark is lined up against it."""
    global _started
    if _started is None:
        _started = started_at(Path("/proc"), time.time, os.sysconf("SC_CLK_TCK"))
    return _started if _started is not None else _marks.get("imports", time.time())


def started_at(proc: Path, clock: Callable[[], float], ticks_per_second: int) -> float | None:
    """When the process of `proc`/self started, as a time of `clock`: now minus its age.

    Its age is the system's uptime (/proc/uptime) less the process's start in clock ticks after boot
    (field 22 of /proc/self/stat): both count from the same boot on the same clock. /proc/stat's
    `btime` (boot as a unix time) is not used: it is fixed at boot, and a VM's wall clock that is
    stepped afterwards (NTP on a freshly booted VM) leaves it behind: "interpreter 82.8 s" for a
    process started 7 s before. None where /proc cannot tell.
    """
    try:
        stat = (proc / "self" / "stat").read_text(encoding="ascii")
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)" start at field 3
        now = clock()
        uptime = float((proc / "uptime").read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return now - max(0.0, uptime - ticks / ticks_per_second)


def own_start() -> tuple[float, float]:
    """(process start, end of the interpreter's start-up): what a run handed to the warm server
    (batch_runner.run.warm) passes on, so that its marks count from this process's launch."""
    return process_started_at(), _marks["interpreter"]


def adopt(process_start: float, interpreter: float) -> None:
    """Count this process's start-up from another's (the run's process that the warm server forked
    this one for): its start and its interpreter's; marks taken before are dropped."""
    global _started
    _marks.clear()
    _parts.clear()
    _marks["interpreter"] = interpreter
    _started = process_start


def mark(phase: str) -> None:
    """Note that `phase` ended now; only its first end counts (a row retried later is not start-up)."""
    _marks.setdefault(phase, time.time())


def split(phase: str, parts: dict[str, float]) -> None:
    """Note the seconds of `phase`'s parts (the replica's: its plan, weights, ...); the first split counts."""
    _parts.setdefault(phase, dict(parts))


def marks() -> dict[str, float]:
    """Unix times: `process_start`, then each phase of PHASES that ended, in order."""
    ordered = {phase: _marks[phase] for phase in PHASES if phase in _marks}
    return {"process_start": process_started_at()} | ordered


def summary() -> str:
    """'first step 41.3 s after the process started (imports 6.1, process_group 0.4, ...)'."""
    times = marks()
    start = times["process_start"]
    names = list(times)
    parts = [f"{b} {times[b] - times[a]:.1f}{_split_text(b)}" for a, b in itertools.pairwise(names)]
    last = names[-1]
    return f"{last.replace('_', ' ')} {times[last] - start:.1f} s after the process started ({', '.join(parts)} s)"


def _split_text(phase: str) -> str:
    """' (plan 0.9, weights 4.1, ...)' for a phase that was split, else ''."""
    parts = _parts.get(phase)
    return f" ({', '.join(f'{name} {seconds:.1f}' for name, seconds in parts.items())})" if parts else ""


def save(path: Path, rank: int) -> None:
    """Write this process's marks (and its rank and host) as JSON; log the one-line summary."""
    log.info("start-up: %s", summary())
    record = {"rank": rank, "host": os.uname().nodename, "pid": os.getpid()} | marks()
    record |= {f"{phase}_parts": parts for phase, parts in _parts.items()}  # seconds, not times
    # Whole or not at all (a full disk leaves the last record, not an empty file), and never through a
    # link planted in output_dir: the rename replaces the link itself.
    from batch_runner.outputs.storage import atomic_write_text

    atomic_write_text(json.dumps(record, indent=1) + "\n", path)


def reset() -> None:
    """Forget the marks (tests, or a second run in one interpreter)."""
    _marks.clear()
    _parts.clear()
