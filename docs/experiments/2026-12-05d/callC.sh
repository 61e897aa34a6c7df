# After .dev5's and .dev6's set-ups: carry [".dev7", ".dev14"]: bash .dev14/callC.sh
T0=$(date +%s)
bash .dev7/setup.sh
export PYTHONPATH=/tmp/site:$PWD
timeout 40 python - <<'PY' 2>&1 | grep -v Warn
import os, threading, time
from batch_runner.run.warm.preload import environment_while_importing
env = environment_while_importing(); print("QUACK_ARCH", env.get("QUACK_ARCH")); os.environ["QUACK_ARCH"] = env.get("QUACK_ARCH", "")
import torch
t = time.time()
import flash_attn.cute
print("fa4 import s", round(time.time() - t, 2), "py threads", len(threading.enumerate()), "os threads", len(os.listdir("/proc/self/task")),
      "libcuda mapped", "libcuda" in open("/proc/self/maps").read(), "torch cuda initialized", torch.cuda.is_initialized())
PY
echo "check at $(( $(date +%s) - T0 )) s"
bash .dev7/bench.sh $(( 590 - ($(date +%s) - T0) )) .dev14/jobsC.txt
