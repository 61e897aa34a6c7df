"""What a run must share with the warm server for a child forked from it to be the process a fresh
start would have made: the interpreter and its flags, the environment (but for what launchers set
per process), the cgroup, namespaces and limits, and the module files as they were imported."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Set by launchers per process, or by the shell per terminal, and read by nothing at import time: a
# run's may differ from the server's. OMP_NUM_THREADS is applied in the child (torch.set_num_threads);
# a run without it, of a server with it, would get the server's count rather than torch's default.
LAUNCH_VARIABLES = frozenset(
    (
        "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
        "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
        "KMP_AFFINITY", "KMP_BLOCKTIME", "CUDA_VISIBLE_DEVICES", "BATCH_RUNNER_LAUNCHER_PID",
        "PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES",
        "PYENV_DIR",  # pyenv's shim sets it to the working folder of each command (the interpreter is compared)
        "BATCH_RUNNER_WARM", "BATCH_RUNNER_WARM_SOCKET",  # read by run.py before it hands over, not after
        "XDG_SEAT", "XDG_VTNR", "STY", "WINDOW", "MOTD_SHOWN",  # per login, screen window or terminal
    )
)  # fmt: skip
LAUNCH_PREFIXES = (
    "TORCHELASTIC_", "ACCELERATE_", "TORCH_NCCL_", "NCCL_",
    "SLURM_", "SLURMD_", "SRUN_", "PMI_", "PMIX_",  # srun's per task (tests/test_slurm.py's warm job)
    "SSH_", "TMUX", "TERM", "XDG_SESSION_",
)  # fmt: skip


def checkout() -> Path:
    """The folder whose batch_runner this process imported (a git checkout, or site-packages)."""
    return Path(__file__).resolve().parents[3]


def process_facts() -> dict[str, Any]:
    """What a forked child would inherit from the server instead of taking from the run: the two
    must be equal (`differences`)."""
    facts: dict[str, Any] = {
        # The folder whose batch_runner this process imported: a server forked from another checkout
        # would run its own code for this one's run.py and conf/ (a socket named by
        # $BATCH_RUNNER_WARM_SOCKET is not per checkout).
        "checkout": str(checkout()),
        "interpreter": sys.executable,
        "prefix": sys.prefix,
        "flags": list(sys.flags),
        "xoptions": {k: str(v) for k, v in sorted(sys._xoptions.items())},
        "warnoptions": list(sys.warnoptions),
        "uid": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
    }
    for name in ("cgroup", "limits"):
        with contextlib.suppress(OSError):
            facts[name] = Path(f"/proc/self/{name}").read_text()
    for ns in ("mnt", "pid", "net", "user", "ipc", "uts"):
        with contextlib.suppress(OSError):
            facts[f"namespace {ns}"] = os.stat(f"/proc/self/ns/{ns}").st_ino
    return facts


def launch_variable(name: str) -> bool:
    return name in LAUNCH_VARIABLES or name.startswith(LAUNCH_PREFIXES)


def differences(server: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """Why a run of these facts and environment cannot be forked from this server: phrases, first
    the facts, then the environment variables (by name) that differ."""
    found = [name for name in server["facts"] if server["facts"][name] != run["facts"].get(name)]
    env_server, env_run = server["env"], run["env"]
    names = sorted(set(env_server) | set(env_run))
    found += [f"${name}" for name in names if not launch_variable(name) and env_server.get(name) != env_run.get(name)]
    if "OMP_NUM_THREADS" in env_server and "OMP_NUM_THREADS" not in env_run:
        found.append("$OMP_NUM_THREADS (the server's is set, the run's is not)")
    if run.get("nice", 0) < server.get("nice", 0):
        found.append("niceness (the run's is lower)")
    return found


def file_state(name: str) -> tuple[int, int]:
    """A file's modification time and size: what `changed_files` compares."""
    info = os.stat(name)
    return info.st_mtime_ns, info.st_size


def module_files() -> dict[str, tuple[int, int]]:
    """Every imported module's file, with its `file_state`, as imported."""
    files: dict[str, tuple[int, int]] = {}
    for module in list(sys.modules.values()):
        name = getattr(module, "__file__", None)
        if name and name not in files:
            with contextlib.suppress(OSError):
                files[name] = file_state(name)
    return files


def changed_files(files: Mapping[str, tuple[int, int]]) -> list[str]:
    """The files of `module_files()` (or any name -> `file_state`) that changed (or went) since."""
    changed = []
    for name, state in files.items():
        try:
            if file_state(name) != state:
                changed.append(name)
        except OSError:
            changed.append(name)
    return changed
