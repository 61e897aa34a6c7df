export PYTHONPATH=/tmp/site:$PWD
python -X importtime -c "import flash_attn.cute" 2> $OUT/importtime.txt
sort -t'|' -k2 -n -r $OUT/importtime.txt | head -8 | cut -c1-150
python - <<'PY' 2>&1 | grep -v Warn
import os, threading, time, sys
t = time.time()
import torch
t1 = time.time()
import flash_attn.cute
print("torch import s", round(t1 - t, 2), "fa4 import s", round(time.time() - t1, 2), "py threads", [x.name for x in threading.enumerate()],
      "os threads", len(os.listdir("/proc/self/task")), "libcuda mapped", "libcuda" in open("/proc/self/maps").read(),
      "torch cuda initialized", torch.cuda.is_initialized())
PY
python - <<'PY' 2>&1 | grep -v Warn
import time, os
os.environ.update({"PYTORCH_NVML_BASED_CUDA_CHECK": "1", "TORCH_WARM_POOL": "0"})
from batch_runner.run.warm.preload import import_if_fork_safe, PRELOADS
import importlib
for n in PRELOADS:
    try: importlib.import_module(n)
    except Exception as e: print("preload", n, e)
for n in ("triton", "flash_attn.cute"):
    t = time.time(); print("probe", n, "->", import_if_fork_safe(n), round(time.time() - t, 1), "s", flush=True)
PY
export BATCH_RUNNER_WARM_SOCKET=/tmp/w/warm.sock
mkdir -p /tmp/w && python -m batch_runner.run.warm 2> $OUT/server.log &
SP=$!
for i in $(seq 1 80); do grep -q "ready at" $OUT/server.log 2>/dev/null && break; sleep 1; done
echo "server after $i s:"; cut -c1-400 $OUT/server.log
kill $SP; sleep 1
