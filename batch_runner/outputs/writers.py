"""Videos written by as many encoders in parallel as the host's CPUs allow, their rows published in order.

x264 on one thread needs ~20 s for 161 frames of 768x512 noise, while a distilled model makes the
next video in a few seconds: one writer thread made one video every ~25 s out of rows that took
7.9 s each. Each encoder stays on one thread (batch_runner.outputs.video: the bytes depend on the
thread count), so throughput comes from encoding several videos at once, one per CPU this process
may use. PyAV leaves Python's lock while x264 and swscale work, so threads suffice: no frames are
copied between processes.

Memory stays bounded: at most `workers + 1` videos' frames are held (all encoders busy and one
more waiting); the thread that makes videos waits for room, and that wait is the row's
`writer_wait_seconds`. Result rows are published in the order their videos were handed over,
each exactly once, whichever encoder finishes first: the results log reads as a serial writer
would have written it. An error in one video's work (a full disk) is raised to the thread that
makes videos at its next hand-over or at the end; the others' rows are still published.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Encoders yield to the thread that feeds the GPU when they share a CPU with it (nice, Linux threads).
ENCODER_NICENESS = 5

Publish = Callable[[Any], None]
Work = Callable[[Publish], None]


def encoder_count(local_processes: int = 1, cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Encoders for this process: the CPUs it may use, shared with the other processes of its host.

    A process pinned to fewer CPUs than the host has was given its share already; one that may use
    all of them shares them with the host's other processes, as it shares a container's CPU quota
    (cgroup v2 cpu.max).
    """
    local_processes = max(1, local_processes)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    usable = affinity // local_processes if affinity >= (os.cpu_count() or 1) else affinity
    with contextlib.suppress(OSError, ValueError):
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            usable = min(usable, int(quota) // int(period) // local_processes)
    return max(1, usable)


class Writers:
    """Runs `work(publish)` on `workers` threads; what each work publishes reaches `publish` in the
    order the works were submitted (see the module docstring)."""

    def __init__(self, publish: Publish, workers: int, pending: int | None = None) -> None:
        self.workers = max(1, workers)
        self.limit = pending or self.workers + 1  # works handed over and not finished
        self._publish = publish
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="videos", initializer=_yield_cpu)
        self._lock = threading.Condition()
        self._submitted = 0
        self._next = 0  # the next submission whose rows are published
        self._running = 0
        self._finished: dict[int, list[Any]] = {}
        self._errors: list[BaseException] = []

    def wait_for_room(self) -> float:
        """Wait until another work may be handed over; returns the seconds waited. Raises the first
        error any work met."""
        started = time.perf_counter()
        with self._lock:
            self._lock.wait_for(lambda: self._running < self.limit or self._errors)
            self._raise()
        return time.perf_counter() - started

    def submit(self, work: Work) -> None:
        """Hand `work` over (after wait_for_room: without it, memory is not bounded)."""
        with self._lock:
            number = self._submitted
            self._submitted += 1
            self._running += 1
        self._pool.submit(self._run, number, work)

    def check(self) -> None:
        """Raise the first error any work met, without waiting."""
        with self._lock:
            self._raise()

    def close(self) -> None:
        """Wait for every work, publish what is left, and raise the first error any work met."""
        self._finish()
        with self._lock:
            self._raise()

    def __enter__(self) -> Writers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.close()
        else:  # the videos already handed over are finished and published; the first error wins
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            self._lock.wait_for(lambda: self._running == 0)
        self._pool.shutdown(wait=True)

    def _run(self, number: int, work: Work) -> None:
        rows: list[Any] = []
        error = None
        try:
            work(rows.append)
        except BaseException as e:  # handed to the thread that makes videos
            error = e
        del work  # its frames: memory is bounded by the works running, not those waiting to publish
        with self._lock:
            self._running -= 1
            if error is not None:
                self._errors.append(error)
            self._finished[number] = rows
            self._publish_in_order()
            self._lock.notify_all()

    def _publish_in_order(self) -> None:
        """Under the lock: publish the rows of every finished work not yet published, in order."""
        while self._next in self._finished:
            for row in self._finished.pop(self._next):
                try:
                    self._publish(row)
                except BaseException as e:
                    self._errors.append(e)
            self._next += 1

    def _raise(self) -> None:
        if self._errors:
            raise self._errors[0]


def _yield_cpu() -> None:
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + ENCODER_NICENESS)
