"""Peak host memory of a merged export against its bound: two layers' worth of bf16 weights plus the largest tensor.

Builds a Llama 4 checkpoint of a few GB with random bf16 weights (written one layer per shard, never the whole
model in memory) and a moefit adapter for it (LoRA on attention, shared expert and every routed expert), then runs
`moefit.export(..., merge=True)` in a child process and reads the child's peak resident set (ru_maxrss). A second
child that only imports what the export imports gives the interpreter's baseline. The export runs with 2 worker
threads (--workers), so that the bound means the same on any machine: each worker holds one piece (a weight or
one expert's slice, with its fp32 working copies on the CPU), so each further worker adds about one piece.

    python benchmarks/export_memory.py --workdir /tmp/moefit-export-mem            # ~3.9 GB checkpoint
    python benchmarks/export_memory.py --layers 2 --hidden 256 --workdir DIR        # small (what the test runs)

Prints a JSON record; --record FILE appends it to FILE (benchmarks/export_memory.json holds the recorded runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def text_config(layers: int, hidden: int, experts: int, vocab: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=hidden, intermediate_size_mlp=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=max(hidden // 128, 2),
                num_key_value_heads=max(hidden // 512, 1), head_dim=min(128, hidden // 2), vocab_size=vocab,
                num_local_experts=experts, num_experts_per_tok=1, max_position_embeddings=4096,
                tie_word_embeddings=False, use_qk_norm=True, attention_chunk_size=1024,
                pad_token_id=5, bos_token_id=0, eos_token_id=4)


def layer_shapes(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, inter, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (nh * hd, h), p + "self_attn.k_proj.weight": (nkv * hd, h),
        p + "self_attn.v_proj.weight": (nkv * hd, h), p + "self_attn.o_proj.weight": (h, nh * hd),
        p + "feed_forward.router.weight": (e, h),
        p + "feed_forward.experts.gate_up_proj": (e, h, 2 * inter),
        p + "feed_forward.experts.down_proj": (e, inter, h),
        p + "feed_forward.shared_expert.gate_proj.weight": (inter, h),
        p + "feed_forward.shared_expert.up_proj.weight": (inter, h),
        p + "feed_forward.shared_expert.down_proj.weight": (h, inter),
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
    }


def nbytes(shapes: dict[str, tuple[int, ...]], elem: int = 2) -> int:
    total = 0
    for s in shapes.values():
        n = elem
        for d in s:
            n *= d
        total += n
    return total


def build_checkpoint(out: Path, layers: int, hidden: int, experts: int, vocab: int) -> dict:
    """config.json, one shard per layer (+ one for embeddings/head), index, tokenizer files."""
    from transformers import Llama4TextConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = text_config(layers, hidden, experts, vocab)
    Llama4TextConfig(**cfg).save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    groups = [{"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
               "model.norm.weight": (hidden,)}] + [layer_shapes(cfg, i) for i in range(layers)]
    weight_map, total, largest = {}, 0, 0
    for n, shapes in enumerate(groups):
        fname = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
                   for k, s in shapes.items()}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        for k in shapes:
            weight_map[k] = fname
        total += nbytes(shapes)
        largest = max([largest] + [nbytes({k: s}) for k, s in shapes.items()])
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    from moefit.assets import tiny_model_dir

    for f in tiny_model_dir().iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, out / f.name)
    return {"total_bytes": total, "largest_tensor_bytes": largest,
            "layer_bytes": max(nbytes(s) for s in groups[1:]), "config": cfg}


def build_run(run: Path, base: Path, r: int = 8) -> None:
    """A moefit run directory for `base`: config.yaml and an adapter with random (non-zero) LoRA weights, in the
    names and shapes moefit's add_lora gives (read off the model skeleton on the meta device)."""
    from transformers import AutoConfig

    from moefit.config import RunConfig, save_config
    from moefit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from moefit.models.build import build_skeleton
    from moefit.models.layers import MoefitLinear
    from moefit.moe.experts import MoefitExperts

    run.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(model=str(base))
    save_config(cfg, run / "config.yaml")
    skel = build_skeleton(AutoConfig.from_pretrained(base), quant=cfg.quantization, dtype=torch.bfloat16,
                          device="meta")
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, m in skel.named_modules():
        if isinstance(m, MoefitLinear):
            state[f"{name}.lora_A"] = torch.randn(r, m.in_features, generator=g) * 0.01
            state[f"{name}.lora_B"] = torch.randn(m.out_features, r, generator=g) * 0.01
        elif isinstance(m, MoefitExperts):
            for p in ("gate", "up", "down"):
                fan_in, fan_out = m.projection_shape(p)
                state[f"{name}.{p}_lora_A"] = torch.randn(m.num_experts, fan_in, r, generator=g) * 0.01
                state[f"{name}.{p}_lora_B"] = torch.randn(m.num_experts, r, fan_out, generator=g) * 0.01
    save_file(state, str(run / ADAPTER_WEIGHTS))
    (run / ADAPTER_CONFIG).write_text(json.dumps({
        "format": "moefit-lora", "version": 1, "base_model": str(base), "model_type": "llama4_text", "r": r,
        "alpha": 2.0 * r, "dropout": 0.0, "targets": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                      "up_proj", "v_proj"],
        "expert_r": r, "expert_alpha": 2.0 * r, "routed_experts": True, "dtype": "float32", "seed": 0}))


IMPORTS = ("import torch, transformers, bitsandbytes, moefit.export, moefit.models.build, moefit.quant.nf4, "
           "transformers.models.llama4.modeling_llama4")


def child_peak(code: str) -> tuple[int, float]:
    """Peak RSS (bytes) and wall seconds of `python -c code` (each call is a fresh process: ru_maxrss of the
    children is a maximum over all of them, so each measurement runs under its own parent)."""
    peak, wall, _ = child_run(code)
    return peak, wall


def child_run(code: str, timeout: float | None = None) -> tuple[int, float, str]:
    """child_peak, plus what the child printed; past `timeout` seconds the child (and its parent) are killed and
    subprocess.TimeoutExpired is raised."""
    wrapper = ("import resource, subprocess, sys, time; t = time.time(); "
               f"subprocess.run([sys.executable, '-c', {code!r}], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.time() - t)")
    proc = subprocess.Popen([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=child_env(), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the wrapper's session: it and the measured child
        proc.communicate()
        raise
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, code, out)
    peak, wall = out.split()[-2:]
    return int(peak), float(wall), out


def child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (kept after it: on the GPU machine
    benchmarks/gpu_env.sh puts bitsandbytes there)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def measure(workdir: Path, layers: int, hidden: int, experts: int, vocab: int, base_mode: bool,
            keep: bool = False, workers: int = 2) -> dict:
    base, run, out = workdir / "base", workdir / "run", workdir / "merged"
    for d in (base, run, out):
        shutil.rmtree(d, ignore_errors=True)
    t = time.time()
    facts = build_checkpoint(base, layers, hidden, experts, vocab)
    build_run(run, base)
    build_s = time.time() - t
    baseline, _ = child_peak(IMPORTS)
    base_arg = f", base={str(base)!r}" if base_mode else ""
    peak, wall = child_peak(f"{IMPORTS}; moefit.export.export({str(run)!r}, {str(out)!r}, merge=True{base_arg}, "
                            f"workers={workers})")
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    bound = 2 * facts["layer_bytes"] + facts["largest_tensor_bytes"]
    if not keep:
        for d in (base, run, out):
            shutil.rmtree(d, ignore_errors=True)
    return {
        "checkpoint_bytes": facts["total_bytes"], "layers": layers, "hidden": hidden, "experts": experts,
        "vocab": vocab, "layer_bytes_bf16": facts["layer_bytes"], "largest_tensor_bytes": facts["largest_tensor_bytes"],
        "bound_bytes": bound, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
        "export_above_baseline_bytes": peak - baseline, "within_bound": peak < bound,
        "within_bound_above_baseline": peak - baseline < bound, "written_bytes": written,
        "export_s": round(wall, 1), "build_s": round(build_s, 1),
        "mode": "--base (original weights)" if base_mode else "default (NF4 round trip)",
        "workers": workers,
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moefit-export-mem"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--mode", choices=["default", "base", "both"], default="both")
    ap.add_argument("--workers", type=int, default=2, help="export worker threads (default 2)")
    ap.add_argument("--record", type=Path, help="append the result to this JSON file")
    args = ap.parse_args()
    results = []
    for base_mode in {"default": [False], "base": [True], "both": [False, True]}[args.mode]:
        r = measure(args.workdir, args.layers, args.hidden, args.experts, args.vocab, base_mode,
                    workers=args.workers)
        print(json.dumps(r, indent=2), flush=True)
        results.append(r)
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
              "torch": torch.__version__, "code": _commit(), "results": results}
    if args.record:
        old = json.loads(args.record.read_text()) if args.record.is_file() else []
        args.record.write_text(json.dumps(old + [record], indent=2) + "\n")
    ok = all(r["within_bound"] for r in results)
    print("PASS" if ok else "FAIL", "peak RSS below 2 layers (bf16) + largest tensor", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
