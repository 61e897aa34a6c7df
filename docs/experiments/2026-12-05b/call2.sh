# After .dev5's set-up (FA4 part 1): carry [".dev6", ".dev13"]:
#   mkdir -p /tmp/images && cp .dev6/images/* /tmp/images/ && bash .dev6/setup.sh && bash .dev13/callB.sh 560
export PYTHONPATH=/tmp/site; T0=$(date +%s); LIMIT=${1:-560}
timeout 170 python .dev13/kernels.py $OUT/kernels.json > $OUT/kernels.log 2>&1; echo "kernels rc=$? at $(( $(date +%s) - T0 )) s"
grep -v Warning $OUT/kernels.log | tail -20
L=$(( LIMIT - ($(date +%s) - T0) ))
timeout $L python scripts/benchmark.py --model skyreels-v2-i2v-14b-540p --parts refs,plans --refs ref-gpu --budgets none --steps 2 --profile \
  --photos /tmp/images --out $OUT/sky > $OUT/sky.log 2>&1; echo "sky rc=$? at $(( $(date +%s) - T0 )) s"
rm -f $OUT/sky/benchmarks.md
grep -E '^\{"recipe"' $OUT/sky.log | cut -c1-300
python -c "
import json; r=[x for x in json.load(open('$OUT/sky/benchmarks.json')) if 'step_kernels' in x]
for x in r: print(x['seconds_per_step'], json.dumps(x['step_kernels'])[:2500])"
