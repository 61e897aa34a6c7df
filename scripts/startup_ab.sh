#!/bin/bash
# Warm start-up, before and after a change, on one GPU host: the same one-row command (CogVideoX-5B,
# random weights, 2 steps, one process through accelerate's launcher module) from two trees, each
# with its own compile cache, alternating so that the host's drift hits both alike.
#
#   git archive <before> | tar -x -C /tmp/before      # the tree to compare against
#   bash scripts/startup_ab.sh /tmp/before $OUT        # on the GPU host, from this tree
#   MODEL=tiny EXTRA=model.weights=tiny bash scripts/startup_ab.sh /tmp/before /tmp/ab   # a try on the CPU
#
# Prints one line per run (and appends it to $OUT/startup.txt): the time from launch to the end of
# the first denoising step and the phases of batch_runner.run.startup, from that run's
# logs/startup-rank00000.json. Each run's log is kept as $OUT/<before|after>-<run>.log.
set -u
BASE=$(cd "$1" && pwd); OUT=$2; AFTER=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
MANIFEST=$(cd "$AFTER" && python -c "
from pathlib import Path; import sys; sys.path.insert(0, 'scripts')
from scaling import write_manifest, PHOTOS; print(write_manifest(Path('/tmp'), 1, PHOTOS))")
L="python -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
A="manifest=$MANIFEST model=${MODEL:-cogvideox-5b-i2v} model.weights=random model.num_inference_steps=2 overwrite=true output.report=false ${EXTRA:-}"
show() {  # scaling.py's reading of the marks: seconds from launch to the first step, and per phase
  (cd "$AFTER/scripts" && python -c "
from pathlib import Path; from scaling import startup_of
r = startup_of(Path('$1'), float('$2'))[0]
print('$3 launch->first_step', r['launch_to_first_step_s'], '|', ', '.join(f'{k} {v}' for k, v in r['phases_s'].items()))") \
    | tee -a "$OUT/startup.txt"
}
one() {  # $1: before | after, $2: the run's name
  if [ "$1" = before ]; then D=$BASE; else D=$AFTER; fi
  s=$(date +%s.%N)
  (cd "$D" && PYTHONPATH=$D:${PYTHONPATH:-} timeout 200 $L run.py $A output_dir=/tmp/o-$1-$2 \
    speed.compile_cache_dir=/tmp/cc-$1 > "$OUT/$1-$2.log" 2>&1)
  show "/tmp/o-$1-$2" "$s" "$1 $2"
}
one before cold; one after cold
for i in 1 2 3; do one before warm$i; one after warm$i; done
