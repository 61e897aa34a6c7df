"""Where torch.compile keeps what it compiled, so that a host's processes and later runs reuse it.

Compiling the transformer blocks is most of the time to the first video. Inductor keys what it
compiles (FX graphs, AOTAutograd graphs, Triton kernels and their autotuning, dynamo's profiles of
dynamic shapes) by the graph, the torch version and the device, and looks it up in one folder,
TORCHINDUCTOR_CACHE_DIR. Its default, /tmp/torchinductor_<user>, is lost when a node reboots or a
SLURM job's private /tmp is wiped, so every job on a fresh node compiles again. We point it at a
folder that outlives the run (speed.compile_cache_dir) before anything compiles, in every process:
the processes of a host, and every later run with the same model and torch, then load instead of
compiling. Entries are written to a temporary name and renamed, so processes (and hosts sharing a
network home) can fill it at the same time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_cache_dir() -> Path:
    """~/.cache/batch_runner/inductor (under XDG_CACHE_HOME when set): per user, kept across runs."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base / "batch_runner" / "inductor"


def configure(cache_dir: str | None) -> Path:
    """Point inductor's caches at `cache_dir`; returns the folder used.

    `cache_dir` None keeps a TORCHINDUCTOR_CACHE_DIR the user exported (e.g. node-local scratch)
    and otherwise uses default_cache_dir(). Must run before the first compile: inductor reads the
    variable when it compiles, and its compile workers inherit it from this process's environment.
    Nothing is created here; inductor makes the folder when it first writes to it.
    """
    if cache_dir:
        folder = Path(cache_dir).expanduser().resolve()
    elif os.environ.get(ENV):
        folder = Path(os.environ[ENV]).expanduser().resolve()
    else:
        folder = default_cache_dir()
    os.environ[ENV] = str(folder)
    # Both are on by default in recent torch; older versions that have them need them switched on.
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "fx_graph_cache"):
        inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    log.debug("compile cache: %s", folder)
    return folder
