"""Where a process's time goes before its first video: a few wall-clock marks, kept per rank.

A short run on many GPUs is dominated by start-up (imports, joining the process group, weights,
compiling), and the issue that sizes it asks "from launch to each process's first denoising step".
Each process notes when it started (the kernel's own record, so the Python interpreter and every
import are counted) and when each phase ended, logs one line, and writes the marks as unix times to
output_dir/logs/startup-rank<r>.json, where a benchmark or a user can line them up against the
moment they launched the command.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# The phases in the order a process passes them; each mark is the time that phase ended.
PHASES = ("interpreter", "imports", "process_group", "replica", "first_step", "first_video")
# run.py imports this module first, so its import marks the end of the interpreter's own start-up.
_marks: dict[str, float] = {"interpreter": time.time()}


def process_started_at() -> float:
    """This process's start as a unix time: /proc's record of it (Linux), else now."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _marks.get("imports", time.time())


def mark(phase: str) -> None:
    """Note that `phase` ended now; only its first end counts (a row retried later is not start-up)."""
    _marks.setdefault(phase, time.time())


def marks() -> dict[str, float]:
    """Unix times: `process_start`, then each phase of PHASES that ended, in order."""
    ordered = {phase: _marks[phase] for phase in PHASES if phase in _marks}
    return {"process_start": process_started_at()} | ordered


def summary() -> str:
    """'first step 41.3 s after the process started (imports 6.1, process_group 0.4, ...)'."""
    times = marks()
    start = times["process_start"]
    names = list(times)
    parts = [f"{b} {times[b] - times[a]:.1f}" for a, b in itertools.pairwise(names)]
    last = names[-1]
    return f"{last.replace('_', ' ')} {times[last] - start:.1f} s after the process started ({', '.join(parts)} s)"


def save(path: Path, rank: int) -> None:
    """Write this process's marks (and its rank and host) as JSON; log the one-line summary."""
    log.info("start-up: %s", summary())
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "host": os.uname().nodename, "pid": os.getpid()} | marks()
    from batch_runner.outputs.storage import write_text_nofollow  # never through a link planted in output_dir

    write_text_nofollow(path, json.dumps(record, indent=1) + "\n")


def reset() -> None:
    """Forget the marks (tests, or a second run in one interpreter)."""
    _marks.clear()
