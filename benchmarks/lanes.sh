#!/usr/bin/env bash
# Run independent one-GPU jobs side by side, one lane per GPU, in one device call: lane i sees only GPU i
# (CUDA_VISIBLE_DEVICES=i) and runs its commands in order; output goes to $OUT/lane<i>.log. Each argument is one
# lane's shell commands (put `timeout S` on each so the call ends in time). Waits for all lanes, then prints the
# last lines of each log.
#   . benchmarks/gpu_env.sh
#   bash benchmarks/lanes.sh \
#     "timeout 500 python3 benchmarks/plan_validation.py --out \$OUT/pv --configs loo --deadline 480" \
#     "timeout 240 python3 benchmarks/families.py --out \$OUT/fam --models qwen3-30b-a3b; timeout 150 ..."
# The lanes share the host's CPUs: a host-bound measurement next to another lane is slower than alone by
# whatever they contend for (record which lanes ran together).
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
pids=()
i=0
for cmd in "$@"; do
  ( export CUDA_VISIBLE_DEVICES=$i; echo "== lane $i on GPU $i, $(date -u +%H:%M:%S): $cmd"; bash -c "$cmd"
    echo "== lane $i done, rc $?, $(date -u +%H:%M:%S)" ) > "$out/lane$i.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
for p in "${pids[@]}"; do wait "$p"; done
for ((j = 0; j < i; j++)); do echo "---- lane $j"; tail -n 15 "$out/lane$j.log"; done
