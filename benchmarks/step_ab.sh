#!/usr/bin/env bash
# Full-depth synthetic Scout (seed recipe LoRA) training steps under several engine settings, one GPU.
#   bash benchmarks/step_ab.sh "SEQ..." "name:VAR=value,VAR=value[:--bench-flag ...]" ...   (JSON under $OUT)
# e.g. bash benchmarks/step_ab.sh "2048" "bnb:" "triton-decoder:MOEFIT_NF4_DECODER=triton" "host::--embeddings-on-host"
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
seqs=$1; shift
for setting in "$@"; do
  IFS=: read -r name vars flags <<< "$setting"
  env ${vars//,/ } python3 -m moefit bench --model llama4-scout --seq-len $seqs --steps 3 --json $flags \
    > "$out/step_$name.json" 2> "$out/step_$name.err" || { tail -20 "$out/step_$name.err"; continue; }
  python3 - "$out/step_$name.json" "$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print(f"{sys.argv[2]:16} seq {r['seq_len']:5}  {r['peak_allocated_bytes'] / 2**30:6.2f} GiB  "
          f"{r['peak_reserved_bytes'] / 2**30:6.2f} GiB reserved  {r['step_s']:.3f} s  {r['tokens_per_s']:5.0f} tok/s  "
          f"GPU busy {100 * r.get('gpu_busy_fraction', float('nan')):.0f} %")
PY
done
