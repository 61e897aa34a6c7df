"""What the warm server imports before it serves, and the checks that a child forked after those
imports can still run: no other thread, no CUDA driver loaded."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

# Modules every run imports, past what importing run.py's own modules does; `--import` adds more.
PRELOADS = (
    "torch",
    "torch._dynamo",
    "torch._inductor.compile_fx",
    "torch._inductor.codecache",
    "torch.distributed.run",
    "diffusers",
    "transformers",
    "accelerate",
    "pandas",
    "pyarrow.parquet",
    "av",
    "PIL.Image",
    "hydra",
    "batch_runner.run.cli",
    "batch_runner.run.runner",
)

# Set while the server imports, then restored. A module that asks torch.cuda.is_available() at import
# would start CUDA's driver here, and no child could then use the GPU; asked through NVML, as torch
# offers for processes that fork, it does not. And inductor may start its compile workers' pool (a
# process and a thread) when it is imported where triton is: each run starts its own at its first compile.
WHILE_IMPORTING = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1", "TORCH_WARM_POOL": "0"}


# Imported only where a child that imports them first finds them harmless to fork after (see
# import_if_fork_safe): they may load CUDA's driver or start threads in some versions.
PROBED_PRELOADS = ("triton", "flash_attn.cute")


class ImportRefused(Exception):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"--import {name}: {why}")


def unforkable() -> str | None:
    """Why a child forked from this process now could not be trusted, or None. No other thread may
    run (it could hold a lock the child would wait on forever), and a child must be able to use the
    GPU where there is one (it cannot once this process started CUDA's driver): one is forked to try."""
    import threading

    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        return f"importing started threads ({', '.join(others)})"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            import torch

            if torch.cuda.is_available():
                torch.zeros(1, device="cuda").add_(1).item()
        except BaseException:
            code = 1
        os._exit(code)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0:
        return None
    with contextlib.suppress(OSError):
        if "libcuda.so" in Path("/proc/self/maps").read_text():
            return "a child forked after the imports could not use the GPU (they loaded CUDA's driver)"
    return "a child forked after the imports could not use the GPU"


_PROBE_CODES = {2: "it is not installed", 3: "it failed to import"}


def import_if_fork_safe(name: str) -> str | None:
    """Import module `name` here if a forked child that imports it first stays forkable (`unforkable`);
    else why not (and nothing was imported here)."""
    import importlib

    sys.stdout.flush()
    sys.stderr.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            problem = unforkable()
            code = 0 if problem is None else 1
            os.write(write, (problem or "").encode())
        except ImportError:
            code = 2
        except BaseException:
            code = 3
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        said = pipe.read().decode()
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 0:
        importlib.import_module(name)
        return None
    return said if code == 1 else _PROBE_CODES.get(code, f"its trial import ended with {code}")


def environment_while_importing() -> dict[str, str]:
    """WHILE_IMPORTING, and what FlashAttention-4 reads when imported: where to keep its compiled
    kernels (in the folder a run's compile cache takes without speed.compile_cache_dir: the run's own
    setting comes too late), and the GPUs' compute capability, without which it starts CUDA's driver
    (fa4.import_environment)."""
    from batch_runner.cluster import devices
    from batch_runner.replica import compile_cache, fa4

    return (
        WHILE_IMPORTING
        | compile_cache.fa4_kernel_cache(compile_cache.cache_folder(None))
        | fa4.import_environment(devices.nvml_compute_capabilities())
    )


def preload(extra_imports: list[str]) -> dict[str, str]:
    """Import what runs import (PRELOADS, every family's pipeline, then PROBED_PRELOADS and
    `extra_imports` where fork-safe), with environment_while_importing() set meanwhile; the probed
    modules left out, and why. Raises ImportRefused for an `extra_imports` module that cannot be imported, or that would
    leave a forked child unable to run."""
    import importlib

    while_importing = environment_while_importing()
    before = {name: os.environ.get(name) for name in while_importing}
    os.environ.update(while_importing)
    skipped: dict[str, str] = {}
    try:
        for name in PRELOADS:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        from batch_runner.families import FAMILY_MODULES, family_named

        for family in FAMILY_MODULES:  # each family's pipeline module, and the models it imports
            with contextlib.suppress(Exception):
                family_named(family).pipeline_class  # noqa: B018  reading it imports it
        for name in PROBED_PRELOADS:
            why = import_if_fork_safe(name)
            if why is not None:
                skipped[name] = why
        for name in extra_imports:
            why = import_if_fork_safe(name)
            if why is not None:
                raise ImportRefused(name, why)
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    return skipped
