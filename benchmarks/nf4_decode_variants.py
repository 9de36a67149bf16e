"""NF4 -> bf16 decoding of one Scout expert bank on the GPU: bitsandbytes against moefit's Triton decoder in each
table lookup and launch shape, every output checked bit for bit against bitsandbytes.

    python benchmarks/nf4_decode_variants.py --out DIR     # writes DIR/nf4_decode_variants.{json,md}

Counted before measuring: a bank of 16 experts x 8,192 x 5,120 = 671 M values reads 336 MB of NF4 + 10.5 MB of
fp32 absmax and writes 1,342 MB of bf16: 1.69 GB per decode. At the copy rate this script measures on the same
card (a device-to-device copy of a 2 GiB tensor, ~4.2 TB/s on an H200), the floor is ~0.40 ms. bitsandbytes took
0.750 ms (53 % of the copy rate) and the Triton decoder with its select tree 0.762 ms (benchmarks/expert_matmul.md).
The select tree costs ~20 integer/select operations per value: ~13 G operations per bank, about the time of the
bytes. A lookup in the 16-entry table (one L1 load per value) or a register gather costs one operation.

Why it matters: with the routed experts decoded at every pass, decoding is the largest counted GPU term of the
seed recipe's step (2.94 s of 8.14 s at 1 x 8, benchmarks/speed_targets.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def copy_rate_bytes_per_s(dev: str, reps: int) -> float:
    """Bytes read + written per second by a device-to-device copy of a 2 GiB bf16 tensor."""
    from moefit.bench import cuda_time

    src = torch.empty(2**30, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / cuda_time(lambda: dst.copy_(src), reps=reps, warmup=3)


def host_cost_us(dev: str, calls: int = 2000) -> dict[str, float]:
    """Host microseconds per decode call, each way the engine can take, on a small weight (512 x 512: the GPU's
    few microseconds per call never set the pace, so the loop's time is the host's). At micro-batch 1 the seed step
    is host-bound: a decoder that is faster on the GPU but dearer to launch can make the step slower."""
    from moefit import engine_switches
    from moefit.config import EngineConfig
    from moefit.kernels import triton_nf4
    from moefit.quant.nf4 import NF4Weight

    q = NF4Weight((1, 512, 512), dtype=torch.bfloat16, device=dev)
    q.quantize_(torch.randn(512, 512, device=dev, dtype=torch.bfloat16), expert=0)
    absmax = q.absmax_fp32()
    shape = list(q.shape)

    def per_call(fn) -> float:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / calls * 1e6

    tuned = triton_nf4._kernel(autotuned=True)
    n_bytes = q.packed.numel()
    costs = {
        "bitsandbytes op (dequantize_4bit)": per_call(lambda: torch.ops.bitsandbytes.dequantize_4bit.default(
            q.packed.reshape(-1, 1), absmax.reshape(-1), q.blocksize, "nf4", shape, torch.bfloat16)),
        "triton-load, through the autotuner": per_call(lambda: tuned[lambda m: (triton_nf4.triton_cdiv(
            n_bytes, m["BLOCK"]),)](q.packed.reshape(-1), absmax.reshape(-1), q.code,
                                    torch.empty(shape, dtype=torch.bfloat16, device=dev), n_bytes, absmax, absmax,
                                    absmax, absmax.shape[-1], 1, BYTES_PER_BLOCK=q.blocksize // 2,
                                    LOOKUP=triton_nf4.LOOKUPS["load"], DOUBLE_QUANT=0, enable_fp_fusion=False)),
        "triton-load, kept launch shape (triton_nf4.decode)": per_call(lambda: triton_nf4.decode(
            q.packed, absmax, q.code, q.blocksize, shape, torch.bfloat16, lookup="load")),
        "triton-load, kept launch shape, scales in kernel": per_call(lambda: triton_nf4.decode(
            q.packed, q.absmax, q.code, q.blocksize, shape, torch.bfloat16, lookup="load",
            double_quant=(q.absmax2, q.offset, q.code2))),
        "scales only (absmax_fp32: bitsandbytes' dequantize_blockwise)": per_call(q.absmax_fp32),
    }
    previous = engine_switches.current()
    for decoder in ("bnb", "triton-load"):
        engine_switches.use(EngineConfig(nf4_decoder=decoder))
        costs[f"NF4Weight.dequantize(), engine.nf4_decoder={decoder}"] = per_call(q.dequantize)
    engine_switches.use(previous)
    return costs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=5120)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    from moefit.bench import cuda_time
    from moefit.kernels import triton_nf4
    from moefit.kernels._nf4_gemm_kernels import DECODE_BLOCKS, DECODE_WARPS
    from moefit.quant.nf4 import NF4Weight
    from moefit.train.metrics import versions

    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    q = NF4Weight((args.experts, args.rows, args.cols), dtype=torch.bfloat16, device=dev)
    for e in range(args.experts):
        q.quantize_(torch.randn(args.rows, args.cols, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02,
                    expert=e)
    absmax = q.absmax_fp32()
    values = q.packed.numel() * 2
    moved = q.packed.numel() + absmax.numel() * 4 + values * 2  # NF4 + absmax read, bf16 written

    host_costs = host_cost_us(dev)
    copy_rate = copy_rate_bytes_per_s(dev, args.reps)
    ref = q.dequantize()
    out = torch.empty_like(ref)
    rows = [{"decoder": "bitsandbytes", "ms": 1e3 * cuda_time(q.dequantize, reps=args.reps, warmup=3),
             "bit_identical": True}]
    # None: as the engine runs it; "dq": the engine's call on a double-quantized weight (uint8 scales decoded in the
    # kernel; the other rows read the fp32 scales decoded beforehand, as bitsandbytes' row does)
    shapes = [(None, None), ("dq", None)] + [(b, w) for b in DECODE_BLOCKS for w in DECODE_WARPS]
    for lookup in triton_nf4.LOOKUPS:
        for block, warps in shapes:
            row = {"decoder": "triton" if block != "dq" else "triton, scales in kernel", "lookup": lookup,
                   "block": None if block == "dq" else block, "warps": warps}
            try:
                def run(lookup=lookup, block=block, warps=warps):
                    if block == "dq":
                        return triton_nf4.decode(q.packed, q.absmax, q.code, q.blocksize, list(q.shape),
                                                 torch.bfloat16, out=out, lookup=lookup,
                                                 double_quant=(q.absmax2, q.offset, q.code2))
                    return triton_nf4.decode(q.packed, absmax, q.code, q.blocksize, list(q.shape),
                                             torch.bfloat16, out=out, lookup=lookup, block=block, warps=warps)
                out.zero_()
                run()
                row["bit_identical"] = bool(torch.equal(out, ref))
                row["ms"] = 1e3 * cuda_time(run, reps=args.reps, warmup=3)
                if block in (None, "dq"):  # the launch shape the autotuner chose for this size
                    row["chosen"] = str(getattr(triton_nf4._kernel(autotuned=True), "best_config", None))
            except Exception as e:  # a variant this Triton cannot compile: recorded, the others measured
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
    for r in rows:
        if "ms" in r:
            r["tb_per_s"] = moved / (r["ms"] / 1e3) / 1e12
            r["of_copy_rate"] = r["tb_per_s"] * 1e12 / copy_rate
            r["vs_bitsandbytes"] = rows[0]["ms"] / r["ms"]
    env = {"device": torch.cuda.get_device_name(), **versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": "python benchmarks/nf4_decode_variants.py " + " ".join(sys.argv[1:]),
           "bank": [args.experts, args.rows, args.cols], "bytes_moved": moved, "copy_rate_bytes_per_s": copy_rate,
           "floor_ms": moved / copy_rate * 1e3}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "nf4_decode_variants.json").write_text(json.dumps({"env": env, "rows": rows,
                                                                      "host_us_per_call": host_costs}, indent=1))
    lines = [f"# NF4 decode of one {args.experts} x {args.rows} x {args.cols} bank ({moved / 1e9:.2f} GB moved)", "",
             f"- `{env['command']}`, {env['date']}, {env['device']}; " +
             ", ".join(f"{k} {v}" for k, v in env.items() if k in ("torch", "triton", "bitsandbytes")),
             f"- copy rate {copy_rate / 1e12:.2f} TB/s: floor {env['floor_ms']:.3f} ms", "",
             "| decoder | lookup | block | warps | ms | TB/s | of copy rate | x bitsandbytes | same bits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.get("ms", float("inf"))):
        if "ms" not in r:
            lines.append(f"| {r['decoder']} | {r.get('lookup', '')} | {r.get('block', '')} | {r.get('warps', '')} | "
                         f"failed: {r['error'][:80]} | | | | |")
            continue
        shape = ("autotuned", "") if r["decoder"].startswith("triton") and r.get("block") is None else \
            (r.get("block", ""), r.get("warps", ""))
        lines.append(f"| {r['decoder']} | {r.get('lookup', '')} | {shape[0]} | {shape[1]} | "
                     f"{r['ms']:.3f} | {r['tb_per_s']:.2f} | {100 * r['of_copy_rate']:.0f} % | "
                     f"{r['vs_bitsandbytes']:.2f} | {'yes' if r['bit_identical'] else 'NO'} |")
    lines += ["", "Host time per call (512 x 512 weight, 2,000 calls; the GPU's part is a few microseconds):", "",
              "| call | host us per call |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in host_costs.items()]
    Path(args.out, "nf4_decode_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4] + lines[4:12] + lines[-len(host_costs) - 2:]))
    return 0 if all(r.get("bit_identical", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
