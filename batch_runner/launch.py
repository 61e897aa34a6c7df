"""Making `accelerate launch --cpu --num_processes N` start N processes.

For GPUs accelerate starts one process per GPU through torch's elastic launcher (torchrun). For
`--cpu` it expects MPI (`--mpirun_hostfile`) and otherwise starts a single process that knows
nothing of the N asked for. A batch runner on a CPU-only machine still wants N processes, so when
we find ourselves in exactly that situation we read N with accelerate's own argument parser from
the launcher's command line and start the N processes with torchrun, as accelerate does for GPUs.

This process then is torchrun's agent: a stop signal makes it stop the processes and wait for them
(batch_runner.lifecycle makes them stop cleanly, and die with it if it is killed); torchrun's log
folder lives in a temporary folder removed when it ends (and swept at the next launch if it was
killed); a rendezvous port already taken is refused with one sentence.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from batch_runner.lifecycle import GRACE_SECONDS, LAUNCHER_PID_ENV, STOP_SIGNALS

LOG_DIR_PREFIX = "batch_runner_torchrun_"


def requested_cpu_processes() -> int:
    """N when accelerate launched us with --cpu --num_processes N>1 as a lone process, else 1."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "RANK" in os.environ:
        return 1
    if "MASTER_ADDR" not in os.environ:  # accelerate sets it only when more than one process was asked
        return 1
    launcher = _parent_argv()
    # `accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`
    starts = [i for i, part in enumerate(launcher) if _is_launch_word(part)]
    if not starts:
        return 1
    from accelerate.commands.launch import launch_command_parser

    args, _ = launch_command_parser().parse_known_args(launcher[starts[0] + 1 :])
    if getattr(args, "mpirun_hostfile", None) or (args.num_machines or 1) > 1:
        return 1
    return int(args.num_processes or 1)


def respawn_with_torchrun(num_processes: int) -> int:
    """Run this same command as `num_processes` local processes under torchrun; returns its status."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    addr, port = os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500"))
    if port_taken(addr, port):
        print(f"error: {_busy(port)}", file=sys.stderr)
        return 2
    _sweep_log_dirs()
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the processes' check that this agent still runs
    with tempfile.TemporaryDirectory(prefix=f"{LOG_DIR_PREFIX}{os.getpid()}_") as log_dir:
        argv = [
            f"--nproc_per_node={num_processes}",
            "--nnodes=1",
            f"--master_addr={addr}",
            f"--master_port={port}",
            f"--log-dir={log_dir}",
            sys.argv[0],
            *sys.argv[1:],
        ]
        try:
            torchrun(argv)
            status = 0
        except SystemExit as e:
            status = int(e.code or 0)
        except SignalException as e:
            status = 128 + int(e.sigval)
        except ChildFailedError as e:
            code = e.get_first_failure()[1].exitcode
            status = code if code > 0 else 128 - code
        except Exception as e:
            status = 1
            if _is_address_in_use(e):
                print(f"error: {_busy(port)}", file=sys.stderr)
                status = 2
        finally:
            _wait_for_children()
    return status


def port_taken(addr: str, port: int) -> bool:
    """Whether torchrun's store could not listen on `port`: it binds every address, as this does."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
                return False
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
    return False


def _busy(port: int) -> str:
    return (
        f"The rendezvous port {port} is already in use (another run, or another program, listens on it); "
        "pick a free one with accelerate launch --main_process_port PORT."
    )


def _is_address_in_use(e: BaseException) -> bool:
    text = str(e).lower()
    return "eaddrinuse" in text or "address already in use" in text


def _wait_for_children() -> None:
    """Return only once the processes this agent started are gone: a launcher outlives its run."""
    import psutil  # accelerate's own dependency

    children = psutil.Process().children(recursive=True)
    if not children:
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        _, left = psutil.wait_procs(children, timeout=GRACE_SECONDS + 5)
        for child in left:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(left, timeout=5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _sweep_log_dirs() -> None:
    """Remove the log folders of agents that were killed before they could remove them."""
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), f"{LOG_DIR_PREFIX}*_*")):
        pid = Path(folder).name[len(LOG_DIR_PREFIX) :].split("_", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_launch_word(part: str) -> bool:
    return part in ("launch", "accelerate.commands.launch") or Path(part).name == "accelerate-launch"


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
