"""Which calls importing flash-attn-4 makes that would start CUDA's driver, on a CPU machine made to
look like a GPU host: torch says CUDA is available, and the torch.cuda calls that start the driver
are recorded instead of made. Run with the device's wheels (Python 3.12, flash-attn-4 4.0.0b36,
quack-kernels 0.6.5, nvidia-cutlass-dsl 4.8.1), with and without QUACK_ARCH:

    python import_probe.py            # 1 call: quack.rmsnorm's get_device_capability
    QUACK_ARCH=90 python import_probe.py   # 0 calls
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import torch

calls: list[tuple[str, str]] = []


def recorder(name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        calls.append((name, "".join(traceback.format_stack(limit=6)[:-1])))
        return (9, 0) if name == "get_device_capability" else 0

    return call


torch.cuda.is_available = lambda: True
for name in ("get_device_capability", "get_device_properties", "current_device", "init", "_lazy_init", "device_count"):
    setattr(torch.cuda, name, recorder(name))

import flash_attn.cute  # noqa: E402, F401

print("QUACK_ARCH", os.environ.get("QUACK_ARCH"), "CUDA-starting calls at import:", len(calls))
for name, where in calls:
    print(name)
    print(where)
