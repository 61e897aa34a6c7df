"""The warm server's child: it becomes the run's process and runs run.py as __main__."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

from batch_runner.run import warm


def become_run(request: Mapping[str, Any], fds: list[int], server_pid: int, server_threads: int) -> int:
    """In the forked child: take over the run's process (streams, folder, environment, arguments,
    start-up marks) and run run.py as __main__; its exit status.

    The environment is the run's exactly. What the server's imports set in theirs is dropped: torch's
    dynamo sets TORCHINDUCTOR_CACHE_DIR to inductor's default when imported, which a fresh run sets
    only after choosing its own compile cache (compile_cache.configure), and which inductor sets again
    from the environment whenever it reads it."""
    warm.mark_forked_run()
    from batch_runner.run import lifecycle

    if not lifecycle.die_with(server_pid):  # the server stops its children when it ends
        return 128 + signal.SIGTERM
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
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
