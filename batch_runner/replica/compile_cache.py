"""Where torch.compile keeps what it compiled, so that a host's processes and later runs reuse it.

Compiling the transformer blocks is most of the time to the first video. Inductor keys what it
compiles (FX graphs, AOTAutograd graphs, Triton kernels and their autotuning, dynamo's profiles of
dynamic shapes) by the graph, the torch version and the device, and looks it up in one folder,
TORCHINDUCTOR_CACHE_DIR. The device includes its index; every process of a one-GPU replica sees its
GPU as cuda:0 (batch_runner.cluster.devices), so what one GPU compiled serves them all. The folder's default,
/tmp/torchinductor_<user>, is lost when a node reboots or a SLURM job's private /tmp is wiped, so
every job on a fresh node compiles again. We point it at a folder that outlives the run
(speed.compile_cache_dir) before anything compiles, in every process: the processes of a host, and
every later run with the same model and torch, then load instead of compiling. Entries are written
to a temporary name and renamed, so processes (and hosts sharing a network home) can fill it at the
same time.

Two settings make that reuse whole on a GPU host:
* AOTAutograd's cache (the step after dynamo's trace) refuses a graph that calls a function it does
  not know, and SDPA's backend context (`sdpa_kernel`), which our attention preference and
  diffusers' native attention backends enter inside every compiled block, puts torch.nn.attention's
  own helpers into the graph. Every warm start then traced each block graph through AOTAutograd and
  inductor's graph passes again: 1.7 s of a warm first step per process on an H100 host
  (CogVideoX-5B, means of 3). Their arguments, the backends, are constants of the graph and so part
  of the cache key: we mark them cacheable, keyed by the torch version.
* Inductor compiles with a pool of min(32, cores) worker processes per process. Four processes on a
  16-core host then start 64 workers, each importing torch, that compete with the processes'
  own start-up; each process gets its share of the host's cores instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from batch_runner import upstream

log = logging.getLogger(__name__)

ENV = "TORCHINDUCTOR_CACHE_DIR"
# flash-attn-4's on-disk kernel cache (flash_attn/cute/cache_utils.py, 4.0.0b36): off unless enabled.
FA4_ENABLED, FA4_DIR = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"
FA4_SUBFOLDER = "flash_attn_cute"


def default_cache_dir() -> Path:
    """~/.cache/batch_runner/inductor (under XDG_CACHE_HOME when set): per user, kept across runs."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base / "batch_runner" / "inductor"


def cache_folder(cache_dir: str | None) -> Path:
    """The folder for `cache_dir` (speed.compile_cache_dir): None keeps a TORCHINDUCTOR_CACHE_DIR the
    user exported (e.g. node-local scratch) and otherwise uses default_cache_dir()."""
    if cache_dir:
        return Path(cache_dir).expanduser().resolve()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser().resolve()
    return default_cache_dir()


def fa4_kernel_cache(folder: Path) -> dict[str, str]:
    """The environment that keeps FlashAttention-4's compiled kernels in `folder`'s FA4_SUBFOLDER.

    flash-attn-4 JIT-compiles each kernel variant at its first call in every process (about 1 s
    each on an H200, docs/experiments/fa4_attention.json; a transformer's self- and
    cross-attention can be two), and keeps them on disk only when asked, by these variables, which
    it reads when it is imported. A user's own values stand.
    """
    ours = {FA4_ENABLED: "1", FA4_DIR: str(folder / FA4_SUBFOLDER)}
    return {name: os.environ.get(name, value) for name, value in ours.items()}


def configure(cache_dir: str | None, processes_on_host: int = 1) -> Path:
    """Point inductor's caches, and FlashAttention-4's, at `cache_dir` (cache_folder), and size
    inductor's compile workers; returns the folder used.

    Must run before the first compile: inductor reads the variable when it compiles, and its compile
    workers inherit it from this process's environment; FlashAttention-4 reads its own when imported.
    Nothing is created here; each makes its folder when it first writes to it.
    `processes_on_host`: this process and the others of its run on this host, which share its cores.
    """
    folder = cache_folder(cache_dir)
    os.environ[ENV] = str(folder)
    os.environ.update(fa4_kernel_cache(folder))
    # Both are on by default in recent torch; older versions that have them need them switched on.
    inductor_config, functorch_config = upstream.inductor_config(), upstream.functorch_config()
    if hasattr(inductor_config, "fx_graph_cache"):
        inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    if hasattr(inductor_config, "unsafe_marked_cacheable_functions"):
        inductor_config.unsafe_marked_cacheable_functions = (
            inductor_config.unsafe_marked_cacheable_functions | attention_context_functions()
        )
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:  # the user's own choice stands
        inductor_config.compile_threads = compile_threads(processes_on_host)
    log.debug("compile cache: %s", folder)
    return folder


def attention_context_functions() -> dict[str, str]:
    """The helpers `sdpa_kernel` leaves in a traced graph, keyed by the torch version (see module docstring)."""
    import torch
    import torch.nn.attention as attention

    return {
        f"{attention.__name__}.{name}": torch.__version__
        for name in upstream.SDPA_CONTEXT_HELPERS
        if hasattr(attention, name)
    }


def compile_threads(processes_on_host: int) -> int:
    """Inductor's own default, min(32, usable cores), shared among the processes of this host."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(32, cores // max(1, processes_on_host)))
