"""Which GPU a launched process sees: only its own, as its cuda:0, when it is a replica by itself.

Inductor keys what it compiles by the device index, so a compile cache that a run warmed on cuda:0
stayed cold for the processes on cuda:1, cuda:2, ... of every later run. A process of
replica.gpus=1 (a replica that spans GPUs keeps them all: it splits each video over NCCL among them)
narrows CUDA_VISIBLE_DEVICES to the GPU accelerate would give it, and every process compiles for,
and loads, cuda:0.

CUDA reads that variable once, when its driver starts in the process, and libraries start it as
they are imported (by asking whether CUDA is available), so this runs before the run imports them,
and asks the driver (not torch) whether it has started: narrowing the variable after it did would
put every process on the same GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator, MutableMapping

CUDA_ERROR_NOT_INITIALIZED = 3


def cuda_driver_started() -> bool:
    """Whether this process's CUDA driver has started (and read CUDA_VISIBLE_DEVICES); False without one."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int()
    return cuda.cuDeviceGetCount(ctypes.byref(count)) != CUDA_ERROR_NOT_INITIALIZED


@contextlib.contextmanager
def _nvml() -> Iterator[ctypes.CDLL | None]:
    """NVML's library, initialised for the block (None where there is none): it reads the GPUs
    without starting CUDA's driver."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        yield None
        return
    if nvml.nvmlInit_v2() != 0:
        yield None
        return
    try:
        yield nvml
    finally:
        nvml.nvmlShutdown()


def _device_count(nvml: ctypes.CDLL | None) -> int:
    count = ctypes.c_uint()
    if nvml is None or nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
        return -1
    return count.value


def nvml_gpu_count() -> int:
    """The host's GPUs as NVML counts them, which does not start CUDA; -1 where NVML cannot tell."""
    with _nvml() as nvml:
        return _device_count(nvml)


def nvml_compute_capabilities() -> set[tuple[int, int]]:
    """The compute capabilities (major, minor) of the host's GPUs as NVML reads them, which does
    not start CUDA; empty where NVML cannot tell (an old driver's library lacks the call)."""
    with _nvml() as nvml:
        found: set[tuple[int, int]] = set()
        for index in range(_device_count(nvml)):  # none where NVML cannot tell (-1)
            device, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
            try:
                if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(device)) != 0:
                    return set()
                if nvml.nvmlDeviceGetCudaComputeCapability(device, ctypes.byref(major), ctypes.byref(minor)) != 0:
                    return set()
            except AttributeError:  # ctypes: no such symbol in this library
                return set()
            found.add((major.value, minor.value))
        return found


def own_gpu(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """The GPU this launched process should see alone: the one accelerate would give it, or None.

    accelerate gives local rank r the visible GPU r % count; that entry of CUDA_VISIBLE_DEVICES (an
    index or a UUID) becomes the whole list. None where there is nothing to narrow: not started by a
    launcher (no LOCAL_RANK), fewer than two GPUs, or CUDA's driver already started here.
    """
    if "LOCAL_RANK" not in environ:
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        gpus = [str(i) for i in range(max(nvml_gpu_count(), 0))]
    else:
        # CUDA reads the list up to its first entry that is not a GPU (so "-1" hides them all).
        gpus = [g.strip() for g in visible.split(",")]
        gpus = gpus[: next((i for i, g in enumerate(gpus) if not g or g.startswith("-")), len(gpus))]
    if len(gpus) < 2 or cuda_driver_started():
        return None
    return gpus[int(environ["LOCAL_RANK"]) % len(gpus)]


def see_own_gpu_only(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Narrow CUDA_VISIBLE_DEVICES to own_gpu(); returns that GPU, or None where it was left as it was."""
    gpu = own_gpu(environ)
    if gpu is not None:
        environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu
