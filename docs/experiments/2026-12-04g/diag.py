"""scripts/benchmark.py with the runner's log; a traceback and the peak at an out-of-memory in timed_call."""

import logging
import runpy
import sys
import traceback

import torch

logging.basicConfig(level=logging.INFO, format="DIAG %(name)s %(message)s")
for noisy in ("diffusers", "transformers", "httpx", "torch"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
sys.path.insert(0, "scripts")
sys.argv = ["scripts/benchmark.py", *sys.argv[1:]]
ns = runpy.run_path("scripts/benchmark.py")
original = ns["timed_call"]


def traced(*args, **kwargs) -> dict:
    try:
        return original(*args, **kwargs)
    except torch.OutOfMemoryError:
        print("DIAG " + "DIAG ".join(traceback.format_exc().splitlines(True)[-24:]))
        print("DIAG max_allocated %.2f GiB" % (torch.cuda.max_memory_allocated() / 2**30))
        raise


ns["project"].__globals__["timed_call"] = traced
ns["main"]()
