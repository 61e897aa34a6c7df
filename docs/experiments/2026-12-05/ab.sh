#!/usr/bin/env bash
# A/B of e7d80d2 (row-major block inputs) on the GPU, same call: the tree before (8b93eb3, in
# .dev10/before) and this one, alternating. carry [".dev10", ".dev7"]:
#   bash .dev7/setup.sh && bash .dev10/ab.sh 560
# Each: scripts/benchmark.py --parts plans --budgets none --steps 3 (step timed with CUDA events).
T0=$(date +%s); LIMIT=${1:-560}
export PYTHONPATH=/tmp/site
python -c "import flash_attn.cute; print('fa4 importable')" 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run() {  # tree model label
  local L=$(( LIMIT - ($(date +%s) - T0) )); [ $L -lt 60 ] && { echo "skip $3 (left $L)"; return; }
  S=$(date +%s)
  timeout $L python $1/scripts/benchmark.py --model $2 --parts plans --budgets none --steps 3 --profile --label=${4--$3} \
    --photos /tmp/images --out $OUT/$3 > $OUT/$3.log 2>&1
  rm -f $OUT/$3/benchmarks.md; echo "== $3 rc=$? took $(( $(date +%s) - S )) s"; grep -E '^\{"recipe"' $OUT/$3.log | cut -c1-300
}
run .dev10/before skyreels-v2-i2v-14b-540p sky-before
run . skyreels-v2-i2v-14b-540p sky-after ""
run .dev10/before hunyuanvideo1.5-i2v-480p hy-before  # second call if the first runs out
run . hunyuanvideo1.5-i2v-480p hy-after
