#!/usr/bin/env bash
# The fused NF4 grouped GEMM on one GPU: correctness (tests/test_gpu.py), kernel A/B at Scout's shapes
# (expert_matmul.py), full-depth Scout steps with MOEFIT_EXPERT_MATMUL=fused vs dequant, and a 4-layer profile.
#   bash benchmarks/expert_matmul_ab.sh   (on the GPU machine; results under $OUT or ./bench-out)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
. benchmarks/gpu_env.sh
python3 -c "import triton; print('triton', triton.__version__)"
python3 -m pytest -q tests/test_gpu.py tests/test_nf4_grouped_mm.py -p no:cacheprovider -x 2>&1 | tail -15
python3 benchmarks/expert_matmul.py --out "$out" 2>&1 | tail -12
for mode in fused dequant; do
  MOEFIT_EXPERT_MATMUL=$mode python3 -m moefit bench --model llama4-scout --seq-len 2048 4096 --steps 3 --json \
    > "$out/bench_$mode.json" 2> "$out/bench_$mode.err" || tail -20 "$out/bench_$mode.err"
  python3 - "$out/bench_$mode.json" "$mode" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print(sys.argv[2], r["seq_len"], f"{r['peak_allocated_bytes'] / 2**30:.2f} GiB",
          f"{r['peak_reserved_bytes'] / 2**30:.2f} GiB reserved", f"{r['step_s']:.3f} s", f"{r['tokens_per_s']:.0f} tok/s")
PY
done
python3 benchmarks/profile_step.py --layers 4 --seq-len 2048 --out "$out" > "$out/profile_log.txt" 2>&1
grep -E "Self CUDA time total|Self CPU time total|profiled_|step " "$out/profile_log.txt"
head -45 "$out/profile_table.txt" | cut -c1-60,100-200
