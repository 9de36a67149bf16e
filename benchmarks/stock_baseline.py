"""The stock stack on Llama 4 Scout shapes: transformers + PEFT + bitsandbytes QLoRA, as a user would set it up.

Two ways transformers holds Scout's routed experts under bitsandbytes:
  * fused  - the HF checkpoint layout: `Llama4TextExperts` keeps `gate_up_proj`/`down_proj` as 3-D bf16
             parameters (bitsandbytes quantizes only nn.Linear), and prepare_model_for_kbit_training upcasts them
             to fp32; PEFT's target_modules reach only the shared expert.
  * per-expert - the layout transformers uses for pre-quantized bnb checkpoints (`SequentialLlama4TextExperts`:
             16 `Linear4bit` per layer); LoRA reaches every expert, but every expert runs on every token.
The model is built at real widths with random weights (no download) at reduced depth; measured at 2 and 4 layers,
the per-layer slope gives the 48-layer figure. One QLoRA step: gradient checkpointing, 8-bit AdamW, batch 1.

    python benchmarks/stock_baseline.py --out DIR [--layers 2 4] [--seq-len 2048 4096]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS_ATTN_SHARED = r".*\.(self_attn\.(q|k|v|o)_proj|shared_expert\.(gate|up|down)_proj)"


def _sequential_experts_class():
    try:
        from transformers.quantizers.base import SequentialLlama4TextExperts

        return SequentialLlama4TextExperts
    except ImportError:  # older/newer transformers keep it elsewhere: same module, same behaviour
        from transformers.models.llama4.modeling_llama4 import Llama4TextMLP

        class SequentialLlama4TextExperts(nn.ModuleList):
            def __init__(self, config):
                super().__init__([Llama4TextMLP(config) for _ in range(config.num_local_experts)])
                self.num_experts = config.num_local_experts

            def forward(self, hidden_states):
                hidden_states = hidden_states.reshape(self.num_experts, -1, hidden_states.shape[-1])
                out = torch.zeros_like(hidden_states)
                for e in range(self.num_experts):
                    out[e] = self[e](hidden_states[e])
                return out

        return SequentialLlama4TextExperts


def build_stock(model: str, layers: int, layout: str, device: str, seed: int = 0):
    import bitsandbytes as bnb
    from transformers import Llama4ForCausalLM
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    from moefit.bench import load_config_json, truncate_layers

    cfg = load_config_json(model)
    truncate_layers(cfg, layers)
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    with torch.device("meta"):
        m = Llama4ForCausalLM(cfg)
    if layout == "per-expert":
        seq_cls = _sequential_experts_class()
        for name, mod in list(m.named_modules()):
            if isinstance(mod, Llama4TextExperts):
                parent, _, leaf = name.rpartition(".")
                with torch.device("meta"):
                    setattr(m.get_submodule(parent), leaf, seq_cls(cfg))
    gen = torch.Generator(device=device).manual_seed(seed)
    std = cfg.initializer_range

    def randn(shape):
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(torch.bfloat16)

    for name, mod in list(m.named_modules()):
        if type(mod) is nn.Linear and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(randn((mod.out_features, mod.in_features)), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True, blocksize=64,
                                         module=q).to(device)
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent), leaf, q)
    for mod in m.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                value = torch.ones(p.shape, dtype=torch.bfloat16, device=device) if "norm" in pname or p.ndim == 1 \
                    else randn(p.shape)
                setattr(mod, pname, nn.Parameter(value, requires_grad=False))
    rot = m.model.rotary_emb
    m.model.rotary_emb = type(rot)(config=cfg).to(device)
    m.is_loaded_in_4bit = True
    m.is_quantized = True
    m.quantization_method = "bitsandbytes"
    return m


def timed_steps(m, opt, *, seq: int, batch: int, grad_accum: int, steps: int, warmup: int, device: str) -> dict:
    """Optimizer steps of a transformers + PEFT model on random tokens: `grad_accum` micro-batches of [batch, seq]
    each; the mean time of the steps after `warmup`, and the peak memory on CUDA."""
    cuda = device.startswith("cuda")
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(grad_accum):
            ids = torch.randint(0, m.config.vocab_size, (batch, seq), generator=gen).to(device)
            (m(input_ids=ids, labels=ids).loss / grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    out = {"step_s": sum(times) / len(times)}
    if cuda:
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return out


def measure(model: str, layers: int, layout: str, lora: str, seq_lens: list[int], device: str, steps: int,
            warmup: int) -> list[dict]:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    t0 = time.perf_counter()
    m = build_stock(model, layers, layout, device)
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = TARGETS_ALL if lora == "seed" else TARGETS_ATTN_SHARED
    m = get_peft_model(m, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=targets,
                                     task_type="CAUSAL_LM"))
    build_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    routed_lora = sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and ".experts." in n)
    opt = bnb.optim.AdamW8bit([p for p in m.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.01)
    m.train()
    out = []
    cuda = device.startswith("cuda")
    for seq in seq_lens:
        rec = {"layout": layout, "lora": lora, "layers": layers, "seq_len": seq, "batch": 1, "build_s": build_s,
               "trainable_params": trainable, "routed_expert_lora_params": routed_lora}
        try:
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            rec.update(timed_steps(m, opt, seq=seq, batch=1, grad_accum=1, steps=steps, warmup=warmup,
                                   device=device))
        except torch.OutOfMemoryError as e:
            rec["error"] = f"out of memory: {str(e)[:200]}"
        except Exception as e:  # noqa: BLE001 - recorded in the results, never hidden
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print("RESULT " + json.dumps(rec), flush=True)
        out.append(rec)
    del opt, m
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def extrapolate(results: list[dict], full_layers: int) -> list[dict]:
    """Per (layout, lora, seq): value(L) = a + b*L fitted through the two depths, evaluated at full depth."""
    rows = []
    keys = sorted({(r["layout"], r["lora"], r["seq_len"]) for r in results})
    for layout, lora, seq in keys:
        pts = sorted((r for r in results if (r["layout"], r["lora"], r["seq_len"]) == (layout, lora, seq)
                      and "error" not in r), key=lambda r: r["layers"])
        row = {"layout": layout, "lora": lora, "seq_len": seq, "measured_layers": [r["layers"] for r in pts]}
        if len(pts) >= 2:
            lo, hi = pts[0], pts[-1]
            d = hi["layers"] - lo["layers"]
            for k in ("peak_allocated_bytes", "peak_reserved_bytes", "step_s"):
                if k in lo and k in hi:
                    slope = (hi[k] - lo[k]) / d
                    row[f"{k}_per_layer"] = slope
                    row[f"{k}_at_{full_layers}"] = lo[k] + slope * (full_layers - lo["layers"])
            if f"step_s_at_{full_layers}" in row:
                row[f"tokens_per_s_at_{full_layers}"] = seq / row[f"step_s_at_{full_layers}"]
        rows.append(row)
    return rows


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama4-scout")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seq-len", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--layouts", nargs="+", default=["per-expert", "fused"])
    ap.add_argument("--loras", nargs="+", default=["seed", "attn-shared"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from moefit.bench import load_config_json

    full = load_config_json(args.model).num_hidden_layers
    results = []
    for layout in args.layouts:
        for lora in args.loras:
            for layers in args.layers:
                results += measure(args.model, layers, layout, lora, args.seq_len, args.device, args.steps,
                                   args.warmup)
    report = {"command": "python " + " ".join(sys.argv), "date": datetime.now(UTC).isoformat(),
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "versions": versions(), "model": args.model, "full_layers": full, "measured": results,
              "extrapolated": extrapolate(results, full)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stock_baseline.json").write_text(json.dumps(report, indent=2))
    gib = 2**30
    print(f"{'layout':<11} {'lora':<12} {'seq':>5} {'alloc GiB@' + str(full):>14} {'step s@' + str(full):>10} "
          f"{'tok/s':>7}")
    for r in report["extrapolated"]:
        a = r.get(f"peak_allocated_bytes_at_{full}")
        s = r.get(f"step_s_at_{full}")
        print(f"{r['layout']:<11} {r['lora']:<12} {r['seq_len']:>5} {a / gib if a else float('nan'):>14.1f} "
              f"{s if s else float('nan'):>10.2f} {r.get(f'tokens_per_s_at_{full}', float('nan')):>7.0f}")
    for r in results:
        if "error" in r:
            print("ERROR", r["layout"], r["lora"], r["layers"], r["seq_len"], r["error"][:150])
    return 0


if __name__ == "__main__":
    sys.exit(main())
