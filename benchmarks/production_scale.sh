#!/usr/bin/env bash
# Issue 16, the seed's production scale, in ONE device call per kind (nvidia-h200-x4, nvidia-h200-x8):
#   bash benchmarks/production_scale.sh 8        # on nvidia-h200-x8 (~8 min); 4 on nvidia-h200-x4
# 1. Scout seed recipe (1 x 8, seq 2048, r=32 everywhere) on 1 GPU and data parallel on N GPUs at the same per-GPU
#    layout, same call: scaling efficiency, every GPU's peak, the all-reduce share (benchmarks/data_parallel.py).
# 2. Maverick QLoRA expert-parallel on N GPUs, and (N >= 4) expert x data: N/2 GPUs per expert group, 2 replicas:
#    tokens/s, per-GPU memory and step time against `moefit plan`; DeepSeek-V3 (671 B) expert-parallel where the
#    plan fits it (4 H200s and up) (benchmarks/expert_parallel.py --configs maverick deepseek).
# Then refit the multi-GPU constants from the records (plan_validation.py reads data_parallel.json) and drop the
# "extrapolated" marks for the measured GPU counts (moefit/plan/calibration.json data_parallel_measured_gpus).
# Results under $OUT (or ./bench-out): dp/data_parallel.{json,md}, ep/expert_parallel.{json,md}, logs.txt.
set -uo pipefail
gpus=${1:-8}
out=${OUT:-bench-out}; mkdir -p "$out"
. benchmarks/gpu_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
timeout 230 python3 benchmarks/data_parallel.py --out "$out/dp" --gpus "$gpus" --configs seed > /tmp/dp.log 2>&1
echo "data parallel exit $?" >> /tmp/dp.log
timeout 330 python3 benchmarks/expert_parallel.py --out "$out/ep" --gpus "$gpus" --configs maverick deepseek > /tmp/ep.log 2>&1
echo "expert parallel exit $?" >> /tmp/ep.log
cat /tmp/dp.log /tmp/ep.log > "$out/logs.txt"
tail -n 12 /tmp/dp.log; tail -n 12 /tmp/ep.log
