"""Where a Scout QLoRA step spends its time: kernel micro-benchmarks at real shapes + a profiled step.

    python benchmarks/profile_step.py --layers 4 --seq-len 2048 [--batch 4] --out DIR
Prints dequantization bandwidth (one expert bank), grouped-GEMM rates, and the top CUDA kernels of one step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


CATEGORIES = [  # (category, substrings of CUDA kernel names), first match wins
    ("NF4 decode (bitsandbytes)", ["kDequantize"]),
    ("NF4 Triton kernels", ["nf4_grouped_mm", "nf4_decode"]),
    ("grouped GEMM (cutlass, torch._grouped_mm)", ["cutlass13device_kernel"]),
    ("dense GEMM (cuBLAS)", ["nvjet", "gemm", "xmma", "cublas"]),
    ("attention (SDPA)", ["flash", "sdpa", "fmha", "attention"]),
    ("elementwise, copies, routing", ["elementwise", "reduce", "index", "scatter", "gather", "sort", "cat",
                                      "copy", "Memcpy", "Memset", "dropout", "fill"]),
]


def kernel_categories(averages) -> dict[str, dict[str, float]]:
    """CUDA kernel time and launch count per category of kernel name."""
    out: dict[str, dict[str, float]] = {}
    for e in averages:
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.key
        cat = next((c for c, keys in CATEGORIES if any(k.lower() in name.lower() for k in keys)), "other")
        slot = out.setdefault(cat, {"ms": 0.0, "kernels": 0})
        slot["ms"] += getattr(e, "self_device_time_total", 0.0) / 1e3
        slot["kernels"] += e.count
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="micro-batch of the measured and profiled step")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from moefit.bench import build_synthetic_model, cuda_time, measure_training, profiled_kernel_seconds
    from moefit.config import LoraConfig
    from moefit.moe.experts import MoefitExperts
    from moefit.moe.grouped import _GROUPED_MM, offsets_from_counts

    m = build_synthetic_model("llama4-scout", num_layers=args.layers, lora=LoraConfig(r=32, alpha=64))
    ex = next(x for x in m.modules() if isinstance(x, MoefitExperts))
    bank = ex.gate
    n = bank.experts * bank.slice_numel
    t = cuda_time(lambda: bank.dequantize())
    res = {"dequant_bank_s": t, "dequant_GBps_written_plus_read": (n * 2 + n / 2 + n / 32) / t / 1e9}
    t2 = cuda_time(lambda: bank._dequantize_by_state(None, torch.bfloat16))
    res["dequant_bank_by_state_s"] = t2
    T = args.seq_len
    counts = torch.full((16,), T // 16, device="cuda")
    x = torch.randn(T, 5120, device="cuda", dtype=torch.bfloat16)
    w = bank.dequantize().transpose(1, 2)
    tg = cuda_time(lambda: _GROUPED_MM(x, w, offs=offsets_from_counts(counts)))
    res["grouped_gate_s"] = tg
    res["grouped_gate_tflops"] = 2 * T * 5120 * 8192 / tg / 1e12
    wc = w.contiguous()
    res["grouped_gate_rowmajor_s"] = cuda_time(lambda: _GROUPED_MM(x, wc, offs=offsets_from_counts(counts)))
    res["copy_GBps"] = 2 * w.numel() * 2 / cuda_time(lambda: w.clone()) / 1e9
    r = measure_training(m, seq_len=T, batch=args.batch, steps=2, warmup=1)
    res["step"] = r
    from torch.profiler import ProfilerActivity, profile

    opt_params = [p for p in m.parameters() if p.requires_grad]
    ids = torch.randint(0, 1000, (args.batch, T), device="cuda")
    for p in opt_params:
        p.grad = None
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        out = m(ids, labels=ids)
        out.loss.backward()
        torch.cuda.synchronize()
        res["profiled_step_wall_s"] = time.perf_counter() - t0
    for p in opt_params:
        p.grad = None
    averages = prof.key_averages()
    res["profiled_kernel_s"] = profiled_kernel_seconds(averages)
    res["profiled_kernels"] = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    res["kernel_categories"] = kernel_categories(averages)
    table = averages.table(sort_by="self_cuda_time_total", row_limit=40)
    # The same step by operator and input shapes: which tensors the elementwise / copy time is spent on.
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=48, max_shapes_column_width=90)
    Path(args.out, "profile_table.txt").write_text(table + "\n\nby operator and input shapes\n" + by_shape)
    Path(args.out, "profile.json").write_text(json.dumps(res, indent=2, default=str))
    print(table)
    print(json.dumps({k: v for k, v in res.items() if k != "step"}, indent=1))
    print("step", {k: r[k] for k in ("step_s", "tokens_per_s", "peak_allocated_bytes")})
    print(f"\n{'kernels of one profiled step (' + str(args.layers) + ' layers + embedding/loss)':58} {'ms':>8} "
          f"{'per layer':>9} {'launches':>9}")
    for cat, v in res["kernel_categories"].items():
        print(f"{cat:58} {v['ms']:8.1f} {v['ms'] / args.layers:9.2f} {v['kernels']:9d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
