"""Making `accelerate launch --cpu --num_processes N [--num_machines M --machine_rank R]` start N processes.

For GPUs accelerate starts one process per GPU through torch's elastic launcher (torchrun), on one
host or, with --num_machines, on each of several. For `--cpu` it expects MPI (`--mpirun_hostfile`)
and otherwise starts a single process that knows nothing of the N asked for, nor of the other
machines: on two machines it starts two unrelated one-process runs that each make every row. A
batch runner on CPU-only machines still wants N processes in one process group, so when we find
ourselves in exactly that situation we read the launch with accelerate's own argument parser from
the launcher's command line and start this machine's N/M processes with torchrun, as accelerate's
multi-GPU launcher does (static rendezvous at --main_process_ip:--main_process_port).

This process then is torchrun's agent: a stop signal makes it stop the processes and wait for them
(batch_runner.run.lifecycle makes them stop cleanly, and die with it if it is killed); torchrun's log
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
from dataclasses import dataclass
from pathlib import Path

from batch_runner.outputs.storage import pid_alive
from batch_runner.run.lifecycle import GRACE_SECONDS, LAUNCHER_PID_ENV, STOP_SIGNALS, parent_pid

LOG_DIR_PREFIX = "batch_runner_torchrun_"


def accelerate_launch(processes: int, cpu: bool = False, port: int | None = None, cli: bool = False) -> list[str]:
    """The README's launch line up to the script, as the benchmarks and tests run it.

    Every setting accelerate would otherwise fill in with a warning is given. `cli`: through the
    `accelerate launch` command; else through its module with this interpreter, the same launcher
    without the CLI importing every other subcommand first (8.5 s less on an H100 host).
    """
    head = ["accelerate", "launch"] if cli else [sys.executable, "-m", "accelerate.commands.launch"]
    parallel = ["--cpu"] if cpu else ["--multi_gpu"] if processes > 1 else []
    settings = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*head, *parallel, "--num_processes", str(processes), *settings] + (
        ["--main_process_port", str(port)] if port else []
    )


def shown(command: list[str]) -> str:
    """A command as a user would type it: `python`, not this interpreter's path."""
    return " ".join("python" if word == sys.executable else word for word in command)


@dataclass(frozen=True)
class CpuLaunch:
    """This machine's part of a --cpu launch: what torchrun needs to start it."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0

    @property
    def needs_respawn(self) -> bool:
        return self.nproc_per_node * self.nnodes > 1


def requested_cpu_launch() -> CpuLaunch:
    """This machine's share of `accelerate launch --cpu` when accelerate started us as a lone process.

    CpuLaunch(1) (nothing to do) unless the launcher asked for more than one process in all.
    """
    alone = CpuLaunch(1)
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "RANK" in os.environ:
        return alone
    if "MASTER_ADDR" not in os.environ:  # accelerate sets it only when more than one process was asked
        return alone
    launcher = _parent_argv()
    # `accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`
    starts = [i for i, part in enumerate(launcher) if _is_launch_word(part)]
    if not starts:
        return alone
    from accelerate.commands.launch import launch_command_parser

    args, _ = launch_command_parser().parse_known_args(launcher[starts[0] + 1 :])
    if getattr(args, "mpirun_hostfile", None):
        return alone
    machines = int(args.num_machines or 1)
    # As accelerate's multi-GPU launcher: --num_processes counts all machines' processes.
    per_machine = max(int(args.num_processes or 1) // machines, 1)
    return CpuLaunch(per_machine, machines, int(args.machine_rank or 0))


def respawn_with_torchrun(launch: CpuLaunch) -> int:
    """Run this same command as this machine's processes under torchrun; returns its status."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    addr, port = os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500"))
    if launch.node_rank == 0 and port_taken(addr, port):  # the main machine's store listens there
        print(f"error: {_busy(port)}", file=sys.stderr)
        return 2
    _sweep_log_dirs()
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the processes' check that this agent still runs
    with tempfile.TemporaryDirectory(prefix=f"{LOG_DIR_PREFIX}{os.getpid()}_") as log_dir:
        argv = [
            f"--nproc_per_node={launch.nproc_per_node}",
            f"--nnodes={launch.nnodes}",
            f"--node_rank={launch.node_rank}",
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
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _is_launch_word(part: str) -> bool:
    return part in ("launch", "accelerate.commands.launch") or Path(part).name == "accelerate-launch"


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{parent_pid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
