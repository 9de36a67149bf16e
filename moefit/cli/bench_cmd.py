"""`moefit bench`: measure peak memory and tokens/s of QLoRA steps at real shapes (synthetic weights: no weights are downloaded)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from ..config import QuantConfig

    p = sub.add_parser(
        "bench", help="measure training memory and speed on this GPU at real shapes, and compare with the plan",
        description="Build the model directly in NF4 on the GPU from random numbers (same modules and code paths as "
        "a loaded checkpoint; no weights are downloaded, a hub id fetches only its config.json), run QLoRA training "
        "steps on random tokens and report peak allocated/reserved memory, step time and tokens/s next to `moefit "
        "plan`'s prediction.")
    p.add_argument("--model", default="llama4-scout", help="a model as `moefit plan --model` reads it: preset name "
                   "(see `moefit plan --help`), a directory with config.json or a hub id (default: llama4-scout)")
    p.add_argument("--synthetic", action="store_true", default=True,
                   help="random weights at the model's real shapes (the only mode; kept for clarity)")
    p.add_argument("--layers", type=int, default=None, help="build only the first N decoder layers (default: all)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[2048], help="sequence lengths to measure")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (default 1)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--expert-rank", type=int, default=None,
                   help="LoRA rank for routed experts (default: --rank; 0 = no LoRA on routed experts)")
    p.add_argument("--targets", default="q,k,v,o,gate,up,down", help="comma-separated LoRA targets")
    p.add_argument("--optimizer", default="adamw_8bit", choices=["adamw_8bit", "paged_adamw_8bit", "adamw"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per sequence length (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (default 1; >= 2 measures the peak with the gradients of "
                        "earlier micro-batches resident, as in a gradient-accumulation run)")
    p.add_argument("--keep-routed-gate-up", action="store_true",
                   help="keep the routed experts' gate/up outputs for the recomputation (train.keep_routed_gate_up:"
                        " true; faster, tokens x top_k x intermediate x 4 bytes more per MoE layer)")
    p.add_argument("--offload-checkpoints", action="store_true",
                   help="keep the layers' saved inputs in host memory (train.offload_checkpoints: true; the layer "
                        "graphs off)")
    p.add_argument("--fp32-linear-scales", action=argparse.BooleanOptionalAction,
                   default=QuantConfig().fp32_linear_scales,
                   help="keep the linears' NF4 block scales in fp32 (quantization.fp32_linear_scales; default: "
                        "%(default)s)")
    p.add_argument("--embeddings-on-host", action="store_true",
                   help="keep the input embedding table in host memory (quantization.embeddings_on_host)")
    p.add_argument("--layout", choices=["as_written", "auto"], default="as_written",
                   help="auto: run the micro-batch layout `train.layout: auto` would choose for the same sequences "
                        "per optimizer step (the planner's faster layout that fits this GPU); recorded")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="cap the allocator at this many GiB and plan for a GPU of that size (e.g. 79.65 on an H200 "
                        "to stand in for an 80 GB H100)")
    p.add_argument("--lora-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="LoRA parameter precision (lora.dtype; default float32)")
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine setting of the run config's engine: section, e.g. --engine expert_matmul=fused "
                        "(see docs/engine.md); repeatable; recorded in the results")
    p.add_argument("--device", default="cuda", help="device (default cuda)")
    p.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                   help="with --gpus: split every MoE layer's routed experts over N of the GPUs (parallel.expert), "
                        "each building only its slice")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="measure data-parallel training on N GPUs of this host (one process each, the LoRA "
                        "gradients summed over them, as `moefit train --gpus N`); per-GPU memory against "
                        "`moefit plan --num-gpus N`, tokens/s of all GPUs together")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _worker_argv(argv: list[str]) -> list[str]:
    """This command's arguments without --gpus N (the workers are the N processes)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out


def run(args: argparse.Namespace) -> int:
    import sys

    from ..bench import bench
    from ..engine_switches import parse
    from ..errors import WorkersFailed
    from ..parallel.dist import context_from_env

    if args.gpus is not None and args.gpus > 1:
        from ..parallel.launch import launch_workers

        code = launch_workers(args.gpus, _worker_argv(sys.argv[1:]), command="moefit bench")
        if code:
            raise WorkersFailed(f"the {args.gpus}-GPU measurement stopped (exit code {code}).", exit_code=code)
        return 0
    results = bench(model=args.model, layers=args.layers, seq_lens=args.seq_len, batch=args.batch, rank=args.rank,
                    expert_rank=args.expert_rank, targets=args.targets.split(","), optimizer=args.optimizer,
                    steps=args.steps, warmup=args.warmup, device=args.device,
                    embeddings_on_host=args.embeddings_on_host, grad_accum=args.grad_accum,
                    fp32_linear_scales=args.fp32_linear_scales,
                    keep_routed_gate_up=args.keep_routed_gate_up, offload_checkpoints=args.offload_checkpoints,
                    engine=parse(args.engine),
                    expert_parallel=args.expert_parallel, lora_dtype=args.lora_dtype, layout=args.layout,
                    memory_limit_bytes=int(args.memory_limit_gib * 2**30) if args.memory_limit_gib else None)
    if not context_from_env().is_main:
        return 0  # rank 0 prints for all
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    gib = 2**30
    print(f"{'seq':>6} {'batch':>5} {'peak alloc':>11} {'reserved':>9} {'planned':>8} {'step s':>7} "
          f"{'tokens/s':>9} {'% of 6N ceiling':>15} {'GPU busy':>8}")
    for r in results["runs"]:
        planned = f"{r['planned_peak_bytes'] / gib:7.2f}" if r.get("planned_peak_bytes") else "      -"
        busy = f"{100 * r['gpu_busy_fraction']:7.0f}%" if r.get("gpu_busy_fraction") is not None else "       -"
        print(f"{r['seq_len']:>6} {r['batch']:>5} {r.get('peak_allocated_bytes', 0) / gib:10.2f}G "
              f"{r.get('peak_reserved_bytes', 0) / gib:8.2f}G {planned}G {r['step_s']:7.2f} "
              f"{r['tokens_per_s']:9.0f} {100 * r['ceiling_fraction']:14.1f}% {busy}")
    for note in sorted({r["plan_note"] for r in results["runs"] if r.get("plan_note")}):
        print(note)
    for r in results["runs"]:
        if "peak_allocated_bytes_per_rank" in r:
            print(f"seq {r['seq_len']}: peak allocated per GPU "
                  f"{' / '.join(f'{b / gib:.2f}' for b in r['peak_allocated_bytes_per_rank'])} GiB; NCCL kernels "
                  f"{r.get('nccl_kernel_s', 0):.3f} s of a {r['step_s']:.2f} s step")
    for r in results["runs"]:
        graphs = r.get("layer_graphs")
        if graphs and (graphs["replayed"] or graphs["disabled"]):
            from ..models.layer_graphs import describe

            print(f"seq {r['seq_len']}: layer graphs (engine.layer_graphs): {describe(graphs)}")
    if results.get("layout"):
        print(f"layout (--layout auto): {results['layout']['why']}")
    gpus = f"{results['world_size']}x " if results.get("world_size", 1) > 1 else ""
    probe = [r["host_op_s"] for r in results["runs"] if r.get("host_op_s")]
    print(f"model {results['model']} ({results['layers']} layers), build {results['build_s']:.1f} s, "
          f"{gpus}{results['device_name']}" + (f"; host issues a small op in {min(probe) * 1e6:.1f} us" if probe
                                                else ""))
    if any(r.get("gpu_busy_fraction", 1.0) < 0.85 for r in results["runs"]):
        print("GPU busy = kernel time of one profiled step / step time. Well below 100 %, the host CPU issuing "
              "kernels sets the pace: a faster host CPU (or longer sequences) helps more than a faster GPU.")
    return 0
