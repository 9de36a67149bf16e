#!/usr/bin/env bash
# Full-depth synthetic Scout (seed recipe LoRA) training steps under several engine settings, one GPU.
#   [STEPS=3] bash benchmarks/step_ab.sh "SEQ..." "name:KEY=value,KEY=value[:--bench-flag ...]" ...
# KEY=value are engine settings (the run config's engine: section, docs/engine.md), passed as --engine KEY=value
# and recorded in each result's "engine".
# e.g. bash benchmarks/step_ab.sh "2048" "bnb:" "triton-decoder:nf4_decoder=triton" "keep::--keep-routed-gate-up"
# Writes one file, $OUT/step_ab.json ({setting: moefit bench --json output}); a failed setting's stderr tail is
# printed. (One file: a device call brings back at most 8.)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
tmp=$(mktemp -d)
seqs=$1; shift
for setting in "$@"; do
  IFS=: read -r name vars flags <<< "$setting"
  engine=""; for kv in ${vars//,/ }; do engine="$engine --engine $kv"; done
  python3 -m moefit bench --model llama4-scout --seq-len $seqs --steps "${STEPS:-3}" --json $engine $flags \
    > "$tmp/$name.json" 2> "$tmp/$name.err" || { echo "$name failed:"; tail -20 "$tmp/$name.err"; continue; }
  python3 - "$tmp/$name.json" "$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["runs"]:
    print(f"{sys.argv[2]:16} seq {r['seq_len']:5} ga {r['grad_accum']}  {r['peak_allocated_bytes'] / 2**30:6.2f} GiB  "
          f"{r['peak_reserved_bytes'] / 2**30:6.2f} GiB reserved  {r['step_s']:.3f} s  {r['tokens_per_s']:5.0f} tok/s  "
          f"kernels {r.get('kernel_s', float('nan')):.3f} s  GPU busy {100 * r.get('gpu_busy_fraction', float('nan')):.0f} %"
          + f"  graph pool {r.get('graph_pool_bytes', 0) / 2**30:.2f} GiB ({r.get('graph_pool_idle_bytes', 0) / 2**30:.2f} idle)"
          + (f"  layer graphs {r['layer_graphs']}" if "layer_graphs" in r else ""))
PY
done
python3 - "$tmp" "$out/step_ab.json" <<'PY'
import json, pathlib, sys
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = json.loads(dest.read_text()) if dest.exists() else {}
for f in sorted(tmp.glob("*.json")):
    try:
        merged[f.stem] = json.loads(f.read_text())
    except json.JSONDecodeError:
        pass
dest.write_text(json.dumps(merged, indent=2) + "\n")
PY
rm -rf "$tmp"
