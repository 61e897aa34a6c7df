"""Making `accelerate launch --cpu --num_processes N` start N processes.

For GPUs accelerate starts one process per GPU through torch's elastic launcher (torchrun). For
`--cpu` it expects MPI (`--mpirun_hostfile`) and otherwise starts a single process that knows
nothing of the N asked for. A batch runner on a CPU-only machine still wants N processes, so when
we find ourselves in exactly that situation we read N with accelerate's own argument parser from
the launcher's command line and start the N processes with torchrun, as accelerate does for GPUs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


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
    from torch.distributed.run import main as torchrun

    argv = [
        f"--nproc_per_node={num_processes}",
        "--nnodes=1",
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
