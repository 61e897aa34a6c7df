# After .dev5's set-up: carry [".dev6", ".dev14"]: bash .dev14/callB.sh 585
T0=$(date +%s); LIMIT=${1:-585}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
mkdir -p /tmp/images && cp .dev6/images/* /tmp/images/ && bash .dev6/setup.sh
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv,noheader
python -c "import torch,diffusers,transformers;print(torch.__version__,torch.version.cuda,diffusers.__version__,transformers.__version__)"
# 1. the warm server's FA4 question
timeout 120 bash .dev14/diag.sh; echo "diag rc=$? at $(( $(date +%s) - T0 )) s"
# 2. SkyReels-V2 540p on the H100, reference and ours in the same call
timeout 340 python scripts/benchmark.py --model skyreels-v2-i2v-14b-540p --parts refs,plans --refs ref-gpu --budgets none --steps 2 --profile \
  --photos /tmp/images --out $OUT/sky > $OUT/sky.log 2>&1; echo "sky rc=$? at $(( $(date +%s) - T0 )) s"
rm -f $OUT/sky/benchmarks.md
grep -E '^\{"recipe"' $OUT/sky.log | cut -c1-400
# 3. the GPU equivalence tests of the new Wan/SkyReels processor
L=$(left); [ $L -gt 30 ] && timeout $L python -m pytest -n 0 -p no:cacheprovider -q -m gpu tests/test_gpu_families.py -k "skyreels or tiny-wan-" --junitxml=$OUT/gpu.xml > $OUT/gpu.log 2>&1
echo "gpu tests rc=$? at $(( $(date +%s) - T0 )) s"; tail -5 $OUT/gpu.log
