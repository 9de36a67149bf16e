#!/usr/bin/env bash
# One device call (~8 min on one H200; split it if the 10-minute limit gets close) that measures every opt-in
# engine setting waiting for a GPU verdict:
#   kernel level  benchmarks/expert_matmul.py (fused NF4 GEMM variants, padded grouped GEMM) at Scout's shapes
#   correctness   tests/test_gpu.py (fused kernel, padding, host embedding, GPU-busy tests)
#   full depth    Scout seed recipe steps at seq 2048 (benchmarks/step_ab.sh) per setting
#   bash benchmarks/engine_ab.sh [fused variant, default select-split]   (results under $OUT or ./bench-out)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
variant=${1:-select-split}
. benchmarks/gpu_env.sh
python3 benchmarks/expert_matmul.py --out "$out" --routings uniform > "$out/expert_matmul_log.txt" 2>&1
tail -6 "$out/expert_matmul_log.txt"
# One run covers every setting: the fused-kernel, padding, host-embedding and GPU-busy tests set their own.
python3 -m pytest -o addopts="" -q -p no:cacheprovider tests/test_gpu.py 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" \
  | head -12
bash benchmarks/step_ab.sh "2048" "base:" "pad:MOEFIT_GROUPED_MM_PAD=1" "keep:MOEFIT_KEEP_EXPERT_GATE_UP=1" \
  "fused:MOEFIT_EXPERT_MATMUL=fused,MOEFIT_NF4_GEMM_VARIANT=$variant"
# The input embedding in host memory (quantization.embeddings_on_host), alone and with the kept gate/up outputs.
bash benchmarks/step_ab.sh "2048" "host-emb::--embeddings-on-host" \
  "host-emb-keep:MOEFIT_KEEP_EXPERT_GATE_UP=1:--embeddings-on-host"
# Where a step's kernel time goes now (4 layers), by category.
python3 benchmarks/profile_step.py --layers 4 --seq-len 2048 --out "$out" > "$out/profile_log.txt" 2>&1
tail -9 "$out/profile_log.txt"
