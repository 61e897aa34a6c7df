"""Making `accelerate launch --cpu --num_processes N [--num_machines M --machine_rank R]` start N processes.

For GPUs accelerate starts one process per GPU through torch's elastic launcher (torchrun), on one
host or, with --num_machines, on each of several. For `--cpu` it expects MPI (`--mpirun_hostfile`)
and otherwise starts a single process that knows nothing of the N asked for, nor of the other
machines: on two machines it starts two unrelated one-process runs that each make every row. A
batch runner on CPU-only machines still wants N processes in one process group, so when we find
ourselves in exactly that situation we read the launch with accelerate's own argument parser from
the launcher's command line and start this machine's N/M processes with torchrun, as accelerate's
multi-GPU launcher does (static rendezvous at --main_process_ip:--main_process_port).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path


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
    from torch.distributed.run import main as torchrun

    argv = [
        f"--nproc_per_node={launch.nproc_per_node}",
        f"--nnodes={launch.nnodes}",
        f"--node_rank={launch.node_rank}",
        f"--master_addr={os.environ['MASTER_ADDR']}",
        f"--master_port={os.environ.get('MASTER_PORT', '29500')}",
        sys.argv[0],
        *sys.argv[1:],
    ]
    try:
        torchrun(argv)
    except SystemExit as e:  # torchrun exits non-zero (ChildFailedError) when a process failed
        return int(e.code or 0)
    except Exception:
        return 1
    return 0


def _is_launch_word(part: str) -> bool:
    return part in ("launch", "accelerate.commands.launch") or Path(part).name == "accelerate-launch"


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
