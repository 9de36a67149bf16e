#!/usr/bin/env bash
# The merged-export logits check at Llama 4 Maverick's hidden width on a CPU host (24 GB): 2 layers (dense, then
# 128 routed experts top-1), experts narrowed to 512 and the dense MLP to 2048 so that it fits; a run with random
# LoRA r=16 (B x 5, about a trained run's size), `moefit export --merge`, and merged_logits_check.py in float32.
# About 3 minutes on 2 cores.   WORK=/tmp/x bash benchmarks/merged_check_cpu.sh
set -euo pipefail
work=${WORK:-/tmp/moefit-merged-check}; rm -rf "$work"; mkdir -p "$work"
python3 benchmarks/width_checkpoint.py "$work/model" --preset llama4-maverick --layers 2 --expert-intermediate 512 \
  --mlp-intermediate 2048
python3 - "$work" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from export_memory import build_run
from safetensors.torch import load_file, save_file
work = Path(sys.argv[1])
build_run(work / "run", work / "model", r=16)
f = work / "run" / "adapter_model.safetensors"
save_file({k: v * 5 if "lora_B" in k else v for k, v in load_file(f).items()}, str(f))
PY
python3 -m moefit export "$work/run" --merge --out "$work/merged"
python3 benchmarks/merged_logits_check.py "$work/run" "$work/model" "$work/merged" --device cpu --tokens 64 \
  --dtypes float32
