#!/usr/bin/env bash
# Device benchmarks: bash .dev3/bench.sh LIMIT_S JOBFILE ; each JOBFILE line: CAP_S NAME ARGS... (ARGS for scripts/benchmark.py, or "pytest ..." )
T0=$(date +%s); LIMIT=$1; JOBS=$2
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev1/whl/*.whl || exit 1
  echo "import site; site.addsitedir('/tmp/site')" > /tmp/site/sitecustomize.py; touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD
echo "install done at $(( $(date +%s) - T0 )) s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python -c "import torch,diffusers,transformers;print(torch.__version__,torch.version.cuda,diffusers.__version__,transformers.__version__)"
while read -r CAP NAME ARGS; do
  [ -z "$CAP" ] && continue
  L=$(left); T=$(( CAP < L ? CAP : L )); [ $T -lt 20 ] && { echo "skip $NAME (left $L)"; continue; }
  S=$(date +%s)
  if [[ $ARGS == pytest* ]]; then
    timeout $T python -m $ARGS --junitxml=$OUT/$NAME.xml > $OUT/$NAME.log 2>&1
  else
    timeout $T python scripts/benchmark.py $ARGS --photos .dev1/images --out $OUT/$NAME > $OUT/$NAME.log 2>&1
  fi
  RC=$?; rm -f $OUT/$NAME/benchmarks.md
  echo "== $NAME rc=$RC took $(( $(date +%s) - S )) s (cap $T) at $(( $(date +%s) - T0 )) s"
  grep -E '^\{"recipe"|passed|failed|Error' $OUT/$NAME.log | tail -12
done < $JOBS
