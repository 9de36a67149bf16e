"""Where a Scout QLoRA step spends its time: kernel micro-benchmarks at real shapes + a profiled step.

    python benchmarks/profile_step.py --layers 4 8 --seq-len 2048 [--batch 4] --out DIR
Prints dequantization bandwidth (one expert bank), grouped-GEMM rates, and the CUDA kernels of one micro-step by
category; with two depths, per decoder layer (their difference: the embedding and the loss drop out).
"""

from __future__ import annotations

import argparse
import json
import sys
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


def profile_one_micro_step(m, batch: int, seq_len: int):
    """One micro-step (forward + backward, as the trainer runs it: labels on the host) under the profiler, after
    `measure_training` has warmed the model (its layer graphs captured for this shape). Returns the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from moefit.models.causal_lm import placed_batch

    opt_params = [p for p in m.parameters() if p.requires_grad]
    ids = torch.randint(0, 1000, (batch, seq_len))
    for p in opt_params:
        p.grad = None
    cuda = m.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        out = m(**placed_batch({"input_ids": ids, "labels": ids}, m, m.device))
        out.loss.backward()
        if cuda:
            torch.cuda.synchronize()
    for p in opt_params:
        p.grad = None
    return prof


def per_layer(shallow: dict, deep: dict, layers: int) -> dict[str, dict[str, float]]:
    """Kernel ms and launches per decoder layer: the difference of two depths' categories over the layers between
    them, so the embedding and the loss (the same at both depths) drop out."""
    out = {}
    for cat in {*shallow, *deep}:
        a, b = shallow.get(cat, {"ms": 0.0, "kernels": 0}), deep.get(cat, {"ms": 0.0, "kernels": 0})
        out[cat] = {"ms": (b["ms"] - a["ms"]) / layers, "kernels": (b["kernels"] - a["kernels"]) / layers}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"]))


def kernel_rates(m, tokens: int) -> dict[str, float]:
    """One expert bank's decode rate, the grouped GEMM's rate over `tokens` rows spread evenly, the copy rate."""
    from moefit.bench import cuda_time
    from moefit.moe.experts import MoefitExperts
    from moefit.moe.grouped import _GROUPED_MM, offsets_from_counts

    bank = next(x for x in m.modules() if isinstance(x, MoefitExperts)).gate
    n = bank.experts * bank.slice_numel
    t = cuda_time(lambda: bank.dequantize())
    counts = torch.full((bank.experts,), tokens // bank.experts, device="cuda")
    x = torch.randn(tokens, bank.slice_shape[1], device="cuda", dtype=torch.bfloat16)
    w = bank.dequantize().transpose(1, 2)
    tg = cuda_time(lambda: _GROUPED_MM(x, w, offs=offsets_from_counts(counts)))
    return {"dequant_bank_s": t, "dequant_GBps_written_plus_read": (n * 2 + n / 2 + n / 32) / t / 1e9,
            "grouped_gate_s": tg, "grouped_gate_tflops": 2 * tokens * bank.slice_numel / tg / 1e12,
            "copy_GBps": 2 * w.numel() * 2 / cuda_time(lambda: w.clone()) / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[4],
                    help="decoder depths to profile; with two (e.g. 4 8) the table is per layer, their difference")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="micro-batch of the measured and profiled step")
    ap.add_argument("--out", default=".")
    ap.add_argument("--model", default="llama4-scout", help="a preset or a directory with config.json")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no kernel rates, no CUDA table)")
    args = ap.parse_args()
    from moefit.bench import build_synthetic_model, measure_training, profiled_kernel_seconds
    from moefit.config import LoraConfig

    # The seed recipe's LoRA, as `moefit bench` builds it: r 32, alpha 64, all seven targets, the routed experts.
    lora = LoraConfig(r=32, alpha=64, targets=["q", "k", "v", "o", "gate", "up", "down"], routed_experts=True)
    res: dict = {"command": " ".join(sys.argv), "model": args.model, "seq_len": args.seq_len, "batch": args.batch, "depths": {}}
    tables = []
    for depth in args.layers:
        m = build_synthetic_model(args.model, num_layers=depth, lora=lora, device=args.device)
        if depth == args.layers[0] and args.device.startswith("cuda"):  # kernel micro-benchmarks at the real shapes, once
            res.update(kernel_rates(m, args.seq_len * args.batch))
        r = measure_training(m, seq_len=args.seq_len, batch=args.batch, steps=2, warmup=1)
        prof = profile_one_micro_step(m, args.batch, args.seq_len)
        averages = prof.key_averages()
        res["depths"][str(depth)] = {
            "step": r, "profiled_kernel_s": profiled_kernel_seconds(averages),
            "profiled_kernels": sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA),
            "kernel_categories": kernel_categories(averages)}
        table = averages.table(sort_by="self_cuda_time_total", row_limit=40)
        # The same micro-step by operator and input shapes: which tensors the elementwise / copy time is spent on.
        by_shape = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=48, max_shapes_column_width=90)
        tables.append(f"=== {depth} layers, one micro-step {args.batch} x {args.seq_len}\n{table}\n\n"
                      f"by operator and input shapes\n{by_shape}")
        print(f"{depth} layers: step {r['step_s']:.3f} s, {r['tokens_per_s']:.0f} tok/s, "
              f"{r.get('peak_allocated_bytes', 0) / 2**30:.2f} GiB, layer graphs {r.get('layer_graphs')}", flush=True)
        del m, prof
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "profile_table.txt").write_text("\n\n".join(tables))
    first = res["depths"][str(args.layers[0])]["kernel_categories"]
    if len(args.layers) >= 2:
        lo, hi = args.layers[0], args.layers[-1]
        res["per_layer"] = per_layer(first, res["depths"][str(hi)]["kernel_categories"], hi - lo)
        title, rows = f"kernels per decoder layer and micro-step ({lo} -> {hi} layers)", res["per_layer"]
    else:
        title, rows = f"kernels of one micro-step ({args.layers[0]} layers + embedding/loss)", first
    Path(args.out, "profile.json").write_text(json.dumps(res, indent=2, default=str))
    print(f"\n{title:58} {'ms':>8} {'launches':>9}")
    for cat, v in rows.items():
        print(f"{cat:58} {v['ms']:8.2f} {v['kernels']:9.0f}")
    print(f"{'total':58} {sum(v['ms'] for v in rows.values()):8.2f} {sum(v['kernels'] for v in rows.values()):9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
