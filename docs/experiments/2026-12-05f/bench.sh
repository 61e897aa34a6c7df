#!/usr/bin/env bash
# Device jobs: bash .devN/bench.sh LIMIT_S JOBFILE ; each JOBFILE line: CAP_S NAME ARGS... (ARGS for
# scripts/benchmark.py, or "pytest ..."). Needs /tmp/site (the set-up's base wheels).
T0=$(date +%s); LIMIT=$1; JOBS=$2
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch,diffusers,transformers;print(torch.__version__,torch.version.cuda,diffusers.__version__,transformers.__version__, hasattr(torch.accelerator,'empty_host_cache'))"
python -c "import flash_attn.cute; print('fa4 importable')" 2>&1 | tail -1
python -c "import av; print('av', av.__version__)" 2>&1 | tail -1
while read -r CAP NAME ARGS; do
  [ -z "$CAP" ] && continue
  L=$(left); T=$(( CAP < L ? CAP : L )); [ $T -lt 20 ] && { echo "skip $NAME (left $L)"; continue; }
  S=$(date +%s)
  if [[ $ARGS == pytest* ]]; then
    timeout $T python -m $ARGS --junitxml=$OUT/$NAME.xml > $OUT/$NAME.log 2>&1
  else
    timeout $T python scripts/benchmark.py $ARGS --photos /tmp/images --out $OUT/$NAME > $OUT/$NAME.log 2>&1
  fi
  RC=$?; rm -f $OUT/$NAME/benchmarks.md
  echo "== $NAME rc=$RC took $(( $(date +%s) - S )) s (cap $T) at $(( $(date +%s) - T0 )) s"
  grep -E '^\{"recipe"|passed|failed|Error|^DIAG' $OUT/$NAME.log | cut -c1-400 | tail -14
done < $JOBS
