#!/usr/bin/env bash
# The fused NF4 grouped GEMM on one GPU: correctness (tests/test_gpu.py), kernel A/B at Scout's shapes
# (expert_matmul.py), full-depth Scout steps with engine.expert_matmul fused vs dequant, and a 4-layer profile.
#   bash benchmarks/expert_matmul_ab.sh   (on the GPU machine; results under $OUT or ./bench-out)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
. benchmarks/gpu_env.sh
python3 -c "import triton; print('triton', triton.__version__)"
python3 -m pytest -q tests/test_gpu.py tests/test_nf4_grouped_mm.py -p no:cacheprovider -x 2>&1 | tail -15
python3 benchmarks/expert_matmul.py --out "$out" 2>&1 | tail -12
bash benchmarks/step_ab.sh "2048 4096" "fused:expert_matmul=fused" "dequant:expert_matmul=dequant"
python3 benchmarks/profile_step.py --layers 4 --seq-len 2048 --out "$out" > "$out/profile_log.txt" 2>&1
grep -E "Self CUDA time total|Self CPU time total|profiled_|step " "$out/profile_log.txt"
head -45 "$out/profile_table.txt" | cut -c1-60,100-200
