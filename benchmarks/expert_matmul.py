"""Routed-expert matmul at Llama 4 Scout's shapes on one GPU: dequantize + torch._grouped_mm vs the fused NF4
grouped-GEMM kernel, for the three expert projections' forward and dgrad.

    python benchmarks/expert_matmul.py --out DIR [--tokens 2048]

Counted before measuring (16 experts, hidden 5,120, intermediate 8,192, T routed rows): one projection is
2 x T x 5,120 x 8,192 FLOP (172 GFLOP at T = 2,048); its NF4 bank is 16 x 5,120 x 8,192 / 2 bytes = 336 MB
(+ 10 MB of scales). Dequantize path: decode (0.34 GB read, 1.34 GB written) + GEMM reading 1.34 GB of bf16;
fused path: 0.34 GB read. Floors are printed next to each time.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure_case(x, q, groups, transpose: bool, peak_flops: float, copy_bw: float, variants: list[str]) -> dict:
    from moefit.bench import cuda_time
    from moefit.kernels import nf4_grouped_mm, triton_nf4
    from moefit.moe.grouped import _GROUPED_MM

    timed = functools.partial(cuda_time, reps=20, warmup=3)

    out_f, in_f = q.slice_shape

    def fused(variant):
        return nf4_grouped_mm.nf4_grouped_matmul(x, q.packed, q.absmax_fp32(), q.code, groups.offs, q.slice_shape,
                                                 q.blocksize, transpose, variant)

    def gemm(w):
        return _GROUPED_MM(x, w.transpose(1, 2) if transpose else w, offs=groups.offs)

    y_ref = gemm(q.dequantize())
    fused_rows = {}
    for variant in variants:
        t0 = time.perf_counter()
        try:
            y_fused = fused(variant)  # the first call autotunes
            torch.cuda.synchronize()
        except Exception as e:  # a variant this Triton cannot compile: record it, measure the others
            fused_rows[variant] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        tune_s = time.perf_counter() - t0
        err = ((y_fused.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
        t = timed(functools.partial(fused, variant))
        fused_rows[variant] = {"ms": t * 1e3, "tflops": 2 * x.shape[0] * x.shape[1] * y_ref.shape[1] / t / 1e12,
                               "rel_err_vs_dequant_path": err, "autotune_s": tune_s,
                               "config": str(getattr(nf4_grouped_mm._kernel(variant.split("-")[1]), "best_config", None))}
    w_bf16 = q.dequantize()
    t_gemm = timed(functools.partial(gemm, w_bf16))
    # torch._grouped_mm picks its tile from rows / experts: <= 128 gives 64-row tiles (a third, mostly empty tile
    # for experts just over 128 rows), above it 128 x 256 tiles. Padding x past 129 rows per expert (rows after
    # the last offset belong to no expert) selects the large tiles.
    pad = max(0, 129 * q.experts - x.shape[0])
    x_padded = torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x
    w_t = w_bf16.transpose(1, 2) if transpose else w_bf16
    padded = functools.partial(_GROUPED_MM, x_padded, w_t, offs=groups.offs)
    t_gemm_padded = timed(padded)
    same = torch.equal(padded()[: x.shape[0]], y_ref)
    del w_bf16, w_t, padded
    t_deq = timed(q.dequantize)
    t_deq_triton = timed(lambda: triton_nf4.decode(q.packed, q.absmax_fp32(), q.code, q.blocksize, list(q.shape),
                                                   torch.bfloat16))
    t_absmax = timed(q.absmax_fp32)
    t_ref = timed(lambda: gemm(q.dequantize()))
    flops = 2 * x.shape[0] * x.shape[1] * (out_f if transpose else in_f)
    nf4_bytes = q.nbytes()
    bf16_bytes = q.experts * q.slice_numel * 2
    return {
        "gflop": flops / 1e9, "fused": fused_rows,
        "dequant_ms": t_deq * 1e3, "triton_decode_ms": t_deq_triton * 1e3, "absmax_ms": t_absmax * 1e3, "grouped_mm_ms": t_gemm * 1e3,
        "grouped_mm_padded_rows": pad, "grouped_mm_padded_ms": t_gemm_padded * 1e3, "padded_output_equal": same,
        "dequant_plus_gemm_ms": t_ref * 1e3, "grouped_mm_tflops": flops / t_gemm / 1e12,
        "floor_dequant_path_ms": ((nf4_bytes + bf16_bytes) / copy_bw
                                  + max(flops / peak_flops, bf16_bytes / copy_bw)) * 1e3,
        "floor_fused_ms": max(flops / peak_flops, nf4_bytes / copy_bw) * 1e3,
    }


def main() -> int:
    from moefit.kernels.nf4_grouped_mm import VARIANTS

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--variants", default="select-join,select-split,shfl-split,shfl-join",
                    help=f"fused-kernel variants to time, from {', '.join(VARIANTS)}")
    ap.add_argument("--routings", default="uniform,skewed")
    ap.add_argument("--banks", default="gate_up,down")
    args = ap.parse_args()
    from moefit.moe.grouped import ExpertGroups
    from moefit.quant.nf4 import NF4Weight

    dev = "cuda"
    experts, hidden, inter, tokens = 16, 5120, 8192, args.tokens
    peak_flops = 788e12  # bf16 dense GEMM measured on this workplace's H200 (benchmarks/plan_validation.json)
    copy_bw = 4.23e12  # device-to-device copy rate measured on the same card (profile_step_h200.json)
    gen = torch.Generator(device=dev).manual_seed(0)
    routings = {
        "uniform": torch.bincount(torch.randint(0, experts, (tokens,), device=dev, generator=gen), minlength=experts),
        "skewed": torch.bincount(torch.multinomial(torch.arange(1, experts + 1, device=dev, dtype=torch.float) ** 2,
                                                   tokens, replacement=True, generator=gen), minlength=experts),
    }
    banks = {}
    for name, (out_f, in_f) in {"gate_up": (inter, hidden), "down": (hidden, inter)}.items():
        q = NF4Weight((experts, out_f, in_f), dtype=torch.bfloat16, device=dev)
        for e in range(experts):
            q.quantize_(torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02, expert=e)
        banks[name] = q
    rows = []
    variants = [v for v in args.variants.split(",") if v]
    for routing in args.routings.split(","):
        counts = routings[routing]
        groups = ExpertGroups(counts)
        for bank_name in args.banks.split(","):
            q = banks[bank_name]
            for transpose in (True, False):
                k = q.slice_shape[1] if transpose else q.slice_shape[0]
                x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16, generator=gen)
                row = measure_case(x, q, groups, transpose, peak_flops, copy_bw, variants)
                rows.append({"routing": routing, "bank": bank_name, "op": "forward" if transpose else "dgrad",
                             "counts_min_max": [int(counts.min()), int(counts.max())], **row})
    from moefit.train.metrics import versions

    env = {"device": torch.cuda.get_device_name(), **versions(), "tokens": tokens,
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "expert_matmul.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(env)
    print(f"{'routing':8} {'bank':8} {'op':8} {'deq':>6} {'tdeq':>6} {'gemm':>6} {'padded':>6} {'deq+gemm':>8} {'floor':>6} {'floor fused':>11}  "
          "fused variants: ms (TFLOP/s, rel err)")
    for r in rows:
        fused = "  ".join(f"{v}: {f['ms']:.3f} ({f['tflops']:.0f}, {f['rel_err_vs_dequant_path']:.0e})"
                          if "ms" in f else f"{v}: failed ({f['error'][:60]})" for v, f in r["fused"].items())
        print(f"{r['routing']:8} {r['bank']:8} {r['op']:8} {r['dequant_ms']:6.3f} {r['triton_decode_ms']:6.3f} {r['grouped_mm_ms']:6.3f} "
              f"{r['grouped_mm_padded_ms']:6.3f} "
              f"{r['dequant_plus_gemm_ms']:8.3f} {r['floor_dequant_path_ms']:6.3f} {r['floor_fused_ms']:11.3f}  {fused}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
