"""The MoE families on one H200: moefit at full depth (synthetic NF4 weights) against the stock transformers + PEFT +
bitsandbytes stack of the same call, with `moefit plan`'s memory and step time for every moefit row.

    python benchmarks/families.py --out DIR [--models all|qwen3-30b-a3b ...]   # on one GPU (~6 min for all)
    python benchmarks/families.py --out DIR --models qwen3-30b-a3b llama3.1-8b \
        --variants "auto24:--layout auto --memory-limit-gib 22.5" \
                   "fast:--layout auto --memory-limit-gib 22.5 --engine rms_norm=fused --fp32-linear-scales"
        (more moefit rows of the same settings, same call, same stock row: the layout the trainer picks on a
        24 GB GPU, and the host-overhead switches)
    python benchmarks/families.py --plan-only                                  # the settings the plan picks (CPU)
    python benchmarks/families.py --report DIR/families.json                   # rewrite the .md from the JSON
    python benchmarks/families.py --smoke --device cpu --models gpt-oss-20b   # the stock path, 1 layer, seq 64

moefit: `moefit bench --json` per model in its own process (clean peak statistics), micro-batch 1 x grad_accum 2
(the second micro-batch runs with the first one's LoRA gradients resident), seq 2048, 8-bit AdamW. TOTAL = peak
reserved + what the process holds outside the caching allocator (CUDA context, cuBLAS), as nvidia-smi shows it.

stock: what a user of transformers + PEFT + bitsandbytes runs: every nn.Linear but lm_head in NF4 (bitsandbytes
quantizes only nn.Linear, so the fused 3-D expert tensors of transformers 5 stay 16-bit), prepare_model_for_kbit_
training (gradient checkpointing, non-quantized weights upcast to fp32), PEFT LoRA with `target_modules` on the
attention and on the MLP Linears that exist (shared experts, dense layers) and `target_parameters` on the fused
routed experts, 8-bit AdamW, the same micro-batch layout. Built at full width with 2 and 4 decoder layers; peak
memory and step time are extrapolated linearly to full depth (the stock stack does not fit most of these models
at full depth: its experts stay 16-bit).

Writes DIR/families.json and DIR/families.md after every measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_parallel import (  # noqa: E402
    _bench,
    _now,
    _plan,
    _run_record,
    _versions,
    call_lines,
    merge_calls,
    recorded_doc_command,
)
from stock_baseline import timed_steps  # noqa: E402

GIB = 2**30
ALL = "q,k,v,o,gate,up,down"
SEQ, BATCH, GRAD_ACCUM = 2048, 1, 2
H100_80GB = 79.65 * GIB  # moefit/plan/gpus.json: what an 80 GB H100 gives the process
# model -> (LoRA rank, expert ranks to try (largest first), settings to try (first that meets the target wins),
#           target: (what, limit bytes) or None)
MODELS: dict[str, dict] = {
    "qwen3-30b-a3b": {"rank": 16, "expert_ranks": [16, 8, 4], "options": [[]],
                      "target": ("total", 22.5 * GIB), "goal": "TOTAL <= 22.5 GiB (one 24 GB GPU), >= 5x stock"},
    "gpt-oss-20b": {"rank": 16, "expert_ranks": [16],
                    "options": [[], ["--embeddings-on-host"], ["--embeddings-on-host", "--lora-dtype", "bfloat16"]],
                    "target": ("peak", 14 * GIB), "goal": "peak allocated <= 14 GiB at r=16"},
    "gpt-oss-120b": {"rank": 16, "expert_ranks": [16, 8], "options": [[], ["--embeddings-on-host"]],
                     "target": ("total", H100_80GB), "goal": "fits one 80 GB GPU (TOTAL <= 79.65 GiB)"},
    "glm-4.5-air": {"rank": 16, "expert_ranks": [16, 8], "options": [[], ["--embeddings-on-host"]],
                    "target": ("total", H100_80GB), "goal": "fits one 80 GB GPU (TOTAL <= 79.65 GiB)"},
    "mixtral-8x7b": {"rank": 16, "expert_ranks": [16], "options": [[], ["--embeddings-on-host"]],
                     "target": ("peak", 28 * GIB), "goal": "peak allocated <= 28 GiB"},
    # dense, for issue 15's target (>= 2x the stock stack); not in `all`
    "llama3.1-8b": {"rank": 16, "expert_ranks": [0], "options": [[]], "target": None,
                    "goal": ">= 2x stock (issue 15)", "in_all": False},
}
STOCK_LAYERS = (2, 4)
STOCK_STEPS, STOCK_WARMUP = 2, 1


def bench_args(model: str, expert_rank: int, option: list[str], seq: int = SEQ) -> list[str]:
    spec = MODELS[model]
    return ["--model", model, "--seq-len", str(seq), "--batch", str(BATCH), "--grad-accum", str(GRAD_ACCUM),
            "--rank", str(spec["rank"]), "--expert-rank", str(expert_rank), "--targets", ALL, *option]


def _measured(res: dict) -> dict:
    """A `moefit bench --json` result as a row's record, with TOTAL (reserved + outside the allocator)."""
    m = _run_record(res)
    m["total_bytes"] = m["peak_reserved_bytes"] + m.get("outside_allocator_bytes", 0)
    return m


def _meets(value: float, target: tuple[str, float] | None) -> bool:
    return target is None or value <= target[1]


def choose(model: str) -> tuple[list[str], dict]:
    """The settings the plan picks: the largest expert rank, then the first option, whose planned figure meets the
    model's target (the last combination if none does: measured and reported as missed)."""
    spec = MODELS[model]
    last = None
    for er in spec["expert_ranks"]:
        for option in spec["options"]:
            args = bench_args(model, er, option)
            p = _plan(args, 1)
            last = (args, p)
            if spec["target"] is None or _meets(p["total_bytes"] if spec["target"][0] == "total"
                                                else p["peak_allocated_bytes"], spec["target"]):
                return args, p
    return last


# ---------------------------------------------------------------------------------------------------- stock stack

def _fused_expert_parameters(model) -> list[str]:
    """Names PEFT's `target_parameters` takes for the routed experts: every >= 3-D parameter of a module whose
    class name ends in 'Experts' (transformers 5 stores them fused: [E, ...])."""
    names = set()
    for mname, module in model.named_modules():
        if type(module).__name__.endswith("Experts"):
            for pname, p in module.named_parameters(recurse=False):
                if p.ndim >= 3:
                    names.add(f"{mname.split('.')[-1]}.{pname}")
    return sorted(names)


def build_stock(model: str, layers: int, device: str, seed: int = 0):
    """The preset at full width with `layers` decoder layers, as transformers builds it with a bitsandbytes NF4
    config: nn.Linear (not lm_head) -> Linear4bit with random NF4 weights, everything else random bf16."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from moefit.bench import load_config_json, truncate_layers

    cfg = load_config_json(model)
    truncate_layers(cfg, layers)
    cfg.use_cache = False
    m = None
    for attn in ("sdpa", "eager"):  # gpt-oss's attention sinks have no SDPA path in some versions
        try:
            with torch.device("meta"):
                m = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)
            break
        except (ValueError, ImportError):
            continue
    gen = torch.Generator(device=device).manual_seed(seed)
    std = getattr(cfg, "initializer_range", 0.02)

    def randn(shape):
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(torch.bfloat16)

    for name, mod in list(m.named_modules()):
        if type(mod) is nn.Linear and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(randn((mod.out_features, mod.in_features)), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True, blocksize=64,
                                         module=q).to(device)
            if mod.bias is not None:
                q.bias = nn.Parameter(randn((mod.out_features,)), requires_grad=False)
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent), leaf, q)
    for mod in m.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                value = torch.ones(p.shape, dtype=torch.bfloat16, device=device) if "norm" in pname \
                    else randn(p.shape)
                setattr(mod, pname, nn.Parameter(value, requires_grad=False))
        for bname, b in list(mod.named_buffers(recurse=False)):
            if b is not None and b.is_meta:  # e.g. rotary inv_freq, a router's correction bias
                mod.register_buffer(bname, torch.zeros(b.shape, dtype=b.dtype, device=device),
                                    persistent=bname not in mod._non_persistent_buffers_set)
    for name, mod in list(m.named_modules()):  # rotary embeddings: their frequencies, computed again for real
        if type(mod).__name__.endswith("RotaryEmbedding"):
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, type(mod)(config=cfg).to(device))
    m.is_loaded_in_4bit = True
    m.is_quantized = True
    m.quantization_method = "bitsandbytes"
    return m


def measure_stock(model: str, layers: int, device: str, seq: int, rank: int, steps: int = STOCK_STEPS,
                  warmup: int = STOCK_WARMUP) -> dict:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    rec = {"layers": layers, "seq_len": seq, "batch": BATCH, "grad_accum": GRAD_ACCUM, "rank": rank}
    t0 = time.perf_counter()
    cuda = device.startswith("cuda")
    try:
        m = build_stock(model, layers, device)
        m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
        linear_names = {n.split(".")[-1] for n, mod in m.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
        targets = [t for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1",
                               "w2", "w3") if t in linear_names]
        params = _fused_expert_parameters(m)
        rec["target_modules"], rec["target_parameters"] = targets, params
        m = get_peft_model(m, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                                         target_parameters=params or None, task_type="CAUSAL_LM"))
        rec["build_s"] = time.perf_counter() - t0
        trainable = [p for p in m.parameters() if p.requires_grad]
        rec["trainable_params"] = sum(p.numel() for p in trainable)
        opt = bnb.optim.AdamW8bit(trainable, lr=1e-5, weight_decay=0.01)
        m.train()
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rec.update(timed_steps(m, opt, seq=seq, batch=BATCH, grad_accum=GRAD_ACCUM, steps=steps, warmup=warmup,
                               device=device))
        del opt, m
    except Exception as e:  # noqa: BLE001 - recorded in the results (an OOM is a result), never hidden
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rec


def extrapolate(points: list[dict], full_layers: int) -> dict:
    """value(L) = value(2) + slope x (L - 2), slope from the two depths (every added layer of the presets is MoE)."""
    ok = sorted((p for p in points if "error" not in p), key=lambda p: p["layers"])
    out: dict = {"full_layers": full_layers}
    if len(ok) < 2:
        return out
    lo, hi = ok[0], ok[-1]
    span = hi["layers"] - lo["layers"]
    for key in ("step_s", "peak_allocated_bytes", "peak_reserved_bytes"):
        if key in lo and key in hi:
            out[key] = lo[key] + (hi[key] - lo[key]) / span * (full_layers - lo["layers"])
    if "step_s" in out:
        out["tokens_per_s"] = BATCH * GRAD_ACCUM * lo["seq_len"] / out["step_s"]
    return out


def _stock_worker(model: str, layers: int, device: str, seq: int, rank: int) -> None:
    print("RESULT " + json.dumps(measure_stock(model, layers, device, seq, rank)), flush=True)


def _stock(model: str, layers: int, device: str, seq: int, rank: int) -> dict:
    """One stock measurement in its own process (clean peak statistics, nothing left behind on an OOM)."""
    import subprocess

    cmd = [sys.executable, __file__, "--stock-worker", model, str(layers), device, str(seq), str(rank)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"layers": layers, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}


# ---------------------------------------------------------------------------------------------------- report

def _pct(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{100 * (a - b) / b:+.1f} %"


def verdicts(row: dict) -> list[str]:
    m, p, s = row.get("measured"), row.get("plan") or {}, (row.get("stock") or {}).get("extrapolated") or {}
    if not m:
        return ["moefit run failed"]
    out = []
    if MODELS[row["model"]]["target"] is not None:
        kind, limit = MODELS[row["model"]]["target"]
        value = m["total_bytes"] if kind == "total" else m["peak_allocated_bytes"]
        out.append(f"{'TOTAL' if kind == 'total' else 'peak'} {value / GIB:.2f} <= {limit / GIB:.2f} GiB: "
                   f"{'met' if value <= limit else 'MISSED'}")
    if p.get("peak_allocated_bytes"):
        mem = abs(p["peak_allocated_bytes"] - m["peak_allocated_bytes"]) / m["peak_allocated_bytes"]
        out.append(f"plan memory {100 * mem:.1f} % {'<=' if mem <= 0.03 else '>'} 3 %")
    if p.get("step_s"):
        st = abs(p["step_s"] - m["step_s"]) / m["step_s"]
        out.append(f"plan step {100 * st:.1f} % {'<=' if st <= 0.15 else '>'} 15 %")
    if s.get("tokens_per_s"):
        x = m["tokens_per_s"] / s["tokens_per_s"]
        goal = {"qwen3-30b-a3b": 5, "llama3.1-8b": 2}.get(row["model"])
        need = f" (>= {goal}x: " + ("met)" if x >= goal else "MISSED)") if goal else ""
        out.append(f"{x:.1f}x stock{need}")
    return out


def merge(docs: list[dict]) -> dict:
    """Several calls' records as one: per model the row of the latest call that measured it (each row keeps its
    moefit and stock measurements from one and the same call, and says which)."""
    calls, rows = merge_calls(docs, "model")
    return {"calls": calls, "seq_len": SEQ, "batch": BATCH, "grad_accum": GRAD_ACCUM,
            "results": [rows[m] for m in MODELS if m in rows] + [r for m, r in rows.items() if m not in MODELS]}


def report(doc: dict) -> str:
    calls, header = call_lines(doc)
    lines = ["# The MoE families on one H200: moefit vs the stock stack, and the planner", "", *header]
    lines += [f"- seq {SEQ}, micro-batch {BATCH} x grad_accum {GRAD_ACCUM}, 8-bit AdamW, LoRA on q,k,v,o,gate,up,down "
              "(gate/up/down: routed experts at the expert rank shown, shared experts and dense MLPs at the rank); "
              "moefit at full depth, synthetic NF4 weights; stock at 2 and 4 layers extrapolated to full depth "
              "(module docstring)", "",
              "| model | settings | peak alloc GiB | plan | TOTAL GiB | plan | tok/s | step s | plan step | GPU busy "
             "| stock tok/s | stock peak GiB | speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in doc["results"]:
        m, p = row.get("measured"), row.get("plan") or {}
        s = (row.get("stock") or {}).get("extrapolated") or {}
        settings = f"r={MODELS[row['model']]['rank']}, expert r={row['expert_rank']}" + \
            (", embedding on host" if "--embeddings-on-host" in row["args"] else "") + \
            (", LoRA in bf16" if "bfloat16" in row["args"] else "")
        stock_tps = f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "-"
        stock_peak = f"{s['peak_allocated_bytes'] / GIB:.1f}" if s.get("peak_allocated_bytes") else "-"
        settings += f" (call {row['call'] + 1})" if "call" in row and len(calls) > 1 else ""
        if not m:
            lines.append(f"| {row['model']} | {settings} | failed | | | | | | | | {stock_tps} | {stock_peak} | |")
            continue
        speed = f"{m['tokens_per_s'] / s['tokens_per_s']:.1f}x" if s.get("tokens_per_s") else "-"
        lines.append(
            f"| {row['model']} | {settings} | {m['peak_allocated_bytes'] / GIB:.2f} | "
            f"{p['peak_allocated_bytes'] / GIB:.2f} ({_pct(p['peak_allocated_bytes'], m['peak_allocated_bytes'])}) "
            f"| {m['total_bytes'] / GIB:.2f} | {p['total_bytes'] / GIB:.2f} | {m['tokens_per_s']:,.0f} | "
            f"{m['step_s']:.3f} | {p.get('step_s') or 0:.3f} ({_pct(p.get('step_s'), m['step_s'])}) | "
            f"{100 * m.get('gpu_busy_fraction', 0):.0f} % | {stock_tps} | {stock_peak} | {speed} |")
    variants = [(row, name, v) for row in doc["results"] for name, v in (row.get("variants") or {}).items()]
    if variants:
        lines += ["", "Variants (the same settings with more `moefit bench` flags, same call, against the same stock "
                  "row):", "", "| model | variant | flags | layout run | tok/s | step s | TOTAL GiB | GPU busy | "
                  "x stock |", "|---|---|---|---|---|---|---|---|---|"]
        for row, name, v in variants:
            vm = v.get("measured")
            s = (row.get("stock") or {}).get("extrapolated") or {}
            if not vm:
                lines.append(f"| {row['model']} | {name} | {' '.join(v['flags'])} | failed | | | | | |")
                continue
            layout = f"{vm.get('batch')} x {vm.get('grad_accum')}"
            x = f"{vm['tokens_per_s'] / s['tokens_per_s']:.1f}x" if s.get("tokens_per_s") else "-"
            lines.append(f"| {row['model']} | {name} | {' '.join(v['flags'])} | {layout} | {vm['tokens_per_s']:,.0f} "
                         f"| {vm['step_s']:.3f} | {vm['total_bytes'] / GIB:.2f} | "
                         f"{100 * vm.get('gpu_busy_fraction', 0):.0f} % | {x} |")
    lines += ["", "| model | goal | verdicts |", "|---|---|---|"]
    for row in doc["results"]:
        lines.append(f"| {row['model']} | {MODELS[row['model']]['goal']} | {'; '.join(verdicts(row))} |")
    for row, name, v in variants:  # a variant against the same goal (e.g. the layout the trainer picks itself)
        if v.get("measured"):
            vm = v["measured"]
            plan = {"peak_allocated_bytes": vm.get("planned_peak_bytes")}  # no plan, no memory verdict
            lines.append(f"| {row['model']}, variant {name} ({vm.get('batch')} x {vm.get('grad_accum')}) | "
                         f"{MODELS[row['model']]['goal']} | {'; '.join(verdicts(row | {'measured': vm, 'plan': plan}))} |")
    lines += ["", "Stock measurements (per depth):", "", "| model | layers | tok/s | peak alloc GiB | target_parameters "
              "| error |", "|---|---|---|---|---|---|"]
    for row in doc["results"]:
        for pt in (row.get("stock") or {}).get("points", []):
            tps = f"{BATCH * GRAD_ACCUM * pt['seq_len'] / pt['step_s']:,.0f}" if pt.get("step_s") else "-"
            peak = f"{pt['peak_allocated_bytes'] / GIB:.2f}" if pt.get("peak_allocated_bytes") else "-"
            lines.append(f"| {row['model']} | {pt['layers']} | {tps} | {peak} | "
                         f"{', '.join(pt.get('target_parameters', []))} | {pt.get('error', '')[:160]} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--models", nargs="+", default=["all"])
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--report", type=Path)
    ap.add_argument("--merge", type=Path, nargs="+", help="families.json files of several calls -> one (stdout)")
    ap.add_argument("--no-stock", action="store_true")
    ap.add_argument("--variants", nargs="+", default=[], metavar="NAME:FLAGS",
                    help="more moefit rows of each model's chosen settings with extra `moefit bench` flags, e.g. "
                         "'auto24:--layout auto --memory-limit-gib 22.5' 'fused:--engine rms_norm=fused "
                         "--fp32-linear-scales' (same call, same stock row)")
    ap.add_argument("--smoke", action="store_true", help="the stock path only, 1 layer, seq 64 (a CPU check)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stock-worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stock_worker:
        model, layers, device, seq, rank = args.stock_worker
        _stock_worker(model, int(layers), device, int(seq), int(rank))
        return 0
    if recorded_doc_command(args, merge, report, Path(__file__).with_name("families_reading.md")):
        return 0
    models = [m for m, spec in MODELS.items() if spec.get("in_all", True)] if args.models == ["all"] else args.models
    if args.smoke:
        for model in models:
            print(model, json.dumps(measure_stock(model, 1, args.device, 64, MODELS[model]["rank"], steps=1,
                                                  warmup=0)))
        return 0
    if args.plan_only:
        for model in models:
            a, p = choose(model)
            print(f"{model:16} {' '.join(a)}\n{'':16} plan: peak {p['peak_allocated_bytes'] / GIB:.2f} GiB, TOTAL "
                  f"{p['total_bytes'] / GIB:.2f} GiB, step {p['step_s']:.3f} s")
        return 0
    if not args.out:
        ap.error("--out DIR is required to measure")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join(["python", "benchmarks/families.py", *sys.argv[1:]]), "date": _now(), "gpu": None,
           "versions": _versions(), "seq_len": SEQ, "batch": BATCH, "grad_accum": GRAD_ACCUM, "results": []}

    def save() -> None:
        (args.out / "families.json").write_text(json.dumps(doc, indent=2) + "\n")
        (args.out / "families.md").write_text(report(doc))

    from moefit.bench import load_config_json

    t0 = time.perf_counter()
    for model in models:
        a, p = choose(model)
        row = {"model": model, "args": a, "expert_rank": int(a[a.index("--expert-rank") + 1]), "plan": p}
        doc["results"].append(row)
        res, err = _bench(a, 1)
        if res is None:
            print(f"{model}: moefit failed:\n{err}", file=sys.stderr, flush=True)
            row["measured"], row["error"] = None, err[-2000:]
        else:
            m = row["measured"] = _measured(res)
            doc["gpu"] = doc["gpu"] or res["device_name"]
            print(f"{model:16} moefit {m['tokens_per_s']:7.0f} tok/s  step {m['step_s']:.3f} s (plan "
                  f"{p['step_s']:.3f})  peak {m['peak_allocated_bytes'] / GIB:.2f} GiB (plan "
                  f"{p['peak_allocated_bytes'] / GIB:.2f})  TOTAL {m['total_bytes'] / GIB:.2f}  busy "
                  f"{100 * m.get('gpu_busy_fraction', 0):.0f} %  ({time.perf_counter() - t0:.0f} s)", flush=True)
        save()
        for variant in args.variants:
            name, _, flags = variant.partition(":")
            res, err = _bench(a + flags.split(), 1)
            v = row.setdefault("variants", {})[name] = {"flags": flags.split()}
            if res is None:
                print(f"{model} [{name}]: moefit failed:\n{err}", file=sys.stderr, flush=True)
                v["error"] = err[-2000:]
            else:
                vm = v["measured"] = _measured(res)
                v["layout"] = res.get("layout")
                print(f"{model:16} [{name}] {vm['tokens_per_s']:7.0f} tok/s  step {vm['step_s']:.3f} s  TOTAL "
                      f"{vm['total_bytes'] / GIB:.2f}  busy {100 * vm.get('gpu_busy_fraction', 0):.0f} %  "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            save()
        if not args.no_stock:
            points = [_stock(model, n, args.device, SEQ, MODELS[model]["rank"]) for n in STOCK_LAYERS]
            full = load_config_json(model).num_hidden_layers
            row["stock"] = {"points": points, "extrapolated": extrapolate(points, full)}
            s = row["stock"]["extrapolated"]
            print(f"{model:16} stock  {s.get('tokens_per_s', 0):7.0f} tok/s at {full} layers (extrapolated), peak "
                  f"{s.get('peak_allocated_bytes', 0) / GIB:.1f} GiB; errors: "
                  f"{[pt.get('error', '')[:120] for pt in points if 'error' in pt]}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            save()
    print(report(doc))
    return 0 if all(r.get("measured") for r in doc["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
