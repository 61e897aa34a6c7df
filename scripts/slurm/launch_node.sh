#!/bin/bash
# One node's `accelerate launch` for a batch_runner run on a SLURM allocation (run by run.sbatch
# through `srun --ntasks-per-node=1`, so once per node). Every node runs the same command except
# for --machine_rank; accelerate's launcher (torchrun) then starts one process per GPU, and the
# processes of all nodes form one process group whose store hands out the rows.
#
#   machines      SLURM_NNODES
#   machine rank  SLURM_NODEID
#   main address  MAIN_PROCESS_IP, else the NodeAddr of the first node of SLURM_JOB_NODELIST
#                 (`scontrol show node`), else that node's name
#   main port     MASTER_PORT, else 10000 + SLURM_JOB_ID % 20000 (two jobs sharing a node do not collide)
#   per node      PROCESSES_PER_NODE, else the node's GPUs: GPUS_PER_NODE, SLURM_GPUS_ON_NODE,
#                 SLURM_GPUS_PER_NODE, CUDA_VISIBLE_DEVICES, `nvidia-smi -L`; with no GPU: --cpu, 1 process
#   launcher      ACCELERATE (default: accelerate; may be several words)
#
# Every node must have the same number of GPUs: --num_processes counts all nodes' processes.
set -euo pipefail

fail() {
    echo "error: $1" >&2
    exit 2
}

for var in SLURM_NNODES SLURM_NODEID SLURM_JOB_NODELIST; do
    [ -n "${!var:-}" ] || fail "$var is not set; run this through scripts/slurm/run.sbatch (sbatch), not by hand."
done
root="${BATCH_RUNNER_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"

gpus_on_this_node() {
    if [ -n "${GPUS_PER_NODE:-}" ]; then
        echo "$GPUS_PER_NODE"
    elif [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
        echo "${SLURM_GPUS_PER_NODE##*:}" # "8" or "h100:8"
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

gpus="$(gpus_on_this_node)"
case "$gpus" in '' | *[!0-9]*) fail "could not read the GPUs per node from '$gpus'; set GPUS_PER_NODE=N." ;; esac
if [ "$gpus" -gt 0 ]; then
    per_node="${PROCESSES_PER_NODE:-$gpus}"
    device=(--multi_gpu)
else
    per_node="${PROCESSES_PER_NODE:-1}"
    device=(--cpu)
fi
total=$((SLURM_NNODES * per_node))
if [ "$total" -eq 1 ]; then
    device=() # --multi_gpu refuses a single process; one GPU or the CPU is found on its own
fi

# The main address is the first node's NodeAddr, the address SLURM itself reaches it at: node names
# need not resolve (NodeName=gpu07 NodeAddr=10.1.0.7). Without a NodeAddr, the node name.
main_address() {
    local first address
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)" || true
    [ -n "$first" ] || return 0
    address="$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n 1)" || true
    address="${address#NodeAddr=}"
    echo "${address:-$first}"
}
main_ip="${MAIN_PROCESS_IP:-$(main_address)}"
[ -n "$main_ip" ] || fail "scontrol gave no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST; set MAIN_PROCESS_IP."
port="${MASTER_PORT:-$((10000 + ${SLURM_JOB_ID:-19500} % 20000))}"

command=(
    ${ACCELERATE:-accelerate} launch ${device[@]+"${device[@]}"} # (bash < 4.4 calls an empty "${a[@]}" unbound)
    --num_machines "$SLURM_NNODES"
    --machine_rank "$SLURM_NODEID"
    --main_process_ip "$main_ip"
    --main_process_port "$port"
    --num_processes "$total"
    --mixed_precision no
    --dynamo_backend no
    "$root/run.py" "$@"
)
echo "node $SLURM_NODEID of $SLURM_NNODES ($(hostname)): $(printf '%q ' "${command[@]}")" >&2
exec "${command[@]}"
