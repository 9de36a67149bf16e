"""`moefit plan`: memory, fit, time and cost of a run before renting a GPU (no torch imported)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="memory by component, fit per GPU, step time, run time and cost of a run",
        description="Plan a QLoRA run from the model's config.json alone: peak GPU memory by component, whether "
        "it fits each GPU and with what margin, the largest sequence / batch that fit, step time, run time, cost, "
        "and the minimum / recommended / ideal hardware. Options override the run config.")
    p.add_argument("config", nargs="?", help="run config (YAML); default: moefit's defaults")
    from ..plan.model_facts import PRESETS

    p.add_argument("--model", help=f"preset ({', '.join(PRESETS)}), a model directory / config.json, or a hub id")
    p.add_argument("--gpu", nargs="+", action="extend", metavar="NAME",
                   help="GPU(s) to check (h100-80gb, h100-94gb, h200, a100-80gb, a100-40gb, l40s, rtx4090); "
                   "default: plan.gpu, else the whole catalogue")
    p.add_argument("--num-gpus", type=int, help="GPUs in data parallel (plan.num_gpus)")
    p.add_argument("--expert-parallel", type=int, metavar="N",
                   help="split every MoE layer's routed experts over N GPUs (parallel.expert; memory per GPU)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (train.max_length)")
    p.add_argument("--batch", type=int, help="sequences per micro-batch (train.batch_size)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (train.grad_accum)")
    p.add_argument("--rank", type=int, help="LoRA rank (lora.r)")
    p.add_argument("--expert-rank", type=int, help="LoRA rank on routed experts (lora.expert_r; 0 = none)")
    p.add_argument("--targets", help="comma-separated LoRA targets among q,k,v,o,gate,up,down (lora.targets)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--steps", type=int, help="optimizer steps of the run (train.max_steps)")
    run.add_argument("--epochs", type=float, help="epochs over --tokens (train.epochs)")
    p.add_argument("--tokens", type=int, help="tokens in the training set (plan.dataset_tokens)")
    p.add_argument("--price", type=float, help="USD per GPU-hour, overriding the shipped price table")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (the same numbers)")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..plan import plan

    gpus, config = _gpus_and_config(args.gpu or [], args.config)
    cfg = load_config(config) if config else None
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    result = plan(cfg, gpus=gpus, model=args.model, seq_len=args.seq_len, batch=args.batch,
                  grad_accum=args.grad_accum, rank=args.rank, expert_rank=args.expert_rank, targets=targets,
                  steps=args.steps, epochs=args.epochs, tokens=args.tokens, num_gpus=args.num_gpus, expert_parallel=args.expert_parallel,
                  price_per_gpu_hour=args.price)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.render())
    return 0 if result.fits else 1


def _gpus_and_config(items: list[str], config: str | None) -> tuple[list[str] | None, str | None]:
    """`--gpu` takes one or more values, so in `plan --gpu h100 h200 run.yaml` it swallows the config: a --gpu value
    that names no GPU but an existing file is the run config when none was given, else an error naming both."""
    from ..errors import ConfigError
    from ..plan.gpus import is_gpu_name

    gpus = []
    for name in (g for item in items for g in item.split(",") if g):
        if not is_gpu_name(name) and name.endswith((".yaml", ".yml")) and not Path(name).is_file():
            raise ConfigError(f"--gpu {name}: not a GPU, and no such config file either.")
        if is_gpu_name(name) or not Path(name).is_file():
            gpus.append(name)
        elif config is None:
            config = name
        else:
            raise ConfigError(f"--gpu {name}: a file, not a GPU, and the run config is already {config}. Give the "
                              "config once, before --gpu: moefit plan CONFIG --gpu NAME [NAME ...].")
    return gpus or None, config
