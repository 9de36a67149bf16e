"""`moefit train`: parse, call moefit.train.train, print the verdict."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from ..errors import ConfigError, MoefitError

DESCRIPTION = """\
Fine-tune a model with QLoRA as a run config says, into a run directory that holds the resolved config
(config.yaml), the final adapter (adapter_config.json + adapter_model.safetensors), checkpoints/, metrics.jsonl,
report.json, loss.png and train.log.

With no CONFIG it trains the embedded tiny Llama 4 MoE on the shipped chat data set on CPU (recipes/tiny.yaml),
in a few minutes. The recipe of the seed for Llama 4 Scout is recipes/llama4-scout-qlora.yaml.

Before a long run, run the smoke test: `moefit train CONFIG --smoke` trains a few steps and exits 1 when the
loss does not fall, a loss is NaN, or peak memory passes the limit."""

EPILOG = """\
examples:
  moefit train                                        the tiny default run (CPU, minutes)
  moefit train run.yaml --smoke --steps 30            test run before the long one
  moefit train run.yaml --output-dir runs/scout1      full run into runs/scout1
  moefit train --resume runs/scout1                   continue it after a stop or a crash
  moefit train run.yaml --set train.lr=1e-4 --set lora.r=16
  moefit train run.yaml --gpus 4                      data parallel on 4 GPUs of this host
  torchrun --nproc-per-node 4 -m moefit train run.yaml   the same, started by torchrun (multi-node: README)
exit codes: 0 done (smoke: passed), 1 smoke run failed, 2 bad config/data/arguments or the run cannot start or
failed (NaN loss, out of memory: the message says what to change), 3 a worker process died (--gpus),
143 / 130 stopped by SIGTERM / SIGINT after saving a checkpoint (continue with --resume; a second signal stops
at once without one)."""


def _parse_set(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4.")
        try:
            overrides[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            overrides[key] = raw
    return overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune (QLoRA) as a run config says; --smoke for the short test run",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="YAML run config (see recipes/). Default: the embedded tiny run; with --resume, the "
                        "config saved in the run directory.")
    p.add_argument("--output-dir", metavar="DIR",
                   help="run directory to write (default: the config's output_dir, else a new folder "
                        "runs/<model>-<YYYYmmdd-HHMMSS>). Refuses a non-empty folder unless --resume or --overwrite.")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue from the newest complete checkpoint of the run in --output-dir, or of the run "
                        "directory PATH, or from the checkpoint folder PATH (RUN/checkpoints/step-N).")
    p.add_argument("--smoke", action="store_true",
                   help="smoke run: train --steps optimizer steps at the recipe's peak learning rate without "
                        "checkpoints, then PASS/FAIL the loss drop (smoke.min_loss_drop), NaNs and peak memory "
                        "(smoke.max_memory_gib, or the plan's peak + 5 %% on CUDA); exit 1 on failure.")
    p.add_argument("--steps", type=int, metavar="N",
                   help="number of optimizer steps of the smoke run (default: smoke.steps in the config, 20). "
                        "Only with --smoke.")
    p.add_argument("--max-steps", type=int, metavar="N",
                   help="stop the full run after N optimizer steps (sets train.max_steps; the schedule is "
                        "fitted to N).")
    p.add_argument("--overwrite", action="store_true",
                   help="let a new run replace the files of an earlier run in --output-dir (its adapter, "
                        "checkpoints, metrics and report; other files stay). Without it a non-empty folder is refused.")
    p.add_argument("--force", action="store_true",
                   help="start on a GPU even when the planner predicts the run does not fit in its memory.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set",
                   help="override one config setting by its dotted key, value read as YAML "
                        "(e.g. --set train.lr=1e-4 --set lora.targets=[q,v]); repeatable.")
    p.add_argument("--gpus", type=int, metavar="N",
                   help="train data-parallel in N processes on this host, one per GPU (CPU processes with gloo "
                        "when there is no GPU). Each optimizer step takes batch_size x grad_accum x N sequences; "
                        "the loss is averaged over all of its label tokens. Under torchrun, leave it out.")
    p.add_argument("--expert-parallel", type=int, metavar="N",
                   help="split every MoE layer's routed experts over N of the GPUs (sets parallel.expert; N divides "
                        "the number of experts and the number of GPUs): for a model whose experts do not fit one GPU.")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing while training (train.log in the run directory still gets everything).")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ..parallel.dist import context_from_env, lost_peer
    from ..parallel.launch import EXIT_WORKER_DIED, report_worker_error
    from ..train import train
    from ..train.preempt import Preempted

    overrides = _parse_set(args.set)
    if args.max_steps is not None:
        overrides["train.max_steps"] = args.max_steps
    if args.expert_parallel is not None:
        overrides["parallel.expert"] = args.expert_parallel
    ctx = context_from_env()
    try:
        result = train(args.config, output_dir=args.output_dir, resume=args.resume, smoke=args.smoke,
                       steps=args.steps, force=args.force, echo=not args.quiet, gpus=args.gpus,
                       overwrite=args.overwrite, **overrides)
    except Preempted as e:
        if ctx.is_main:
            print(f"moefit train: {e}", file=sys.stderr)
        return e.exit_code
    except MoefitError as e:
        if not ctx.enabled:
            raise
        # One of several workers: rank 0 prints; every rank reports to the launcher, which names the rank.
        report_worker_error(f"error: {e}")
        if ctx.is_main:
            print(f"moefit train: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not (ctx.enabled and lost_peer(e)):
            raise
        # Another worker died (killed, out of memory): the launcher names it; this one only says it lost it.
        print(f"moefit train (rank {ctx.rank}): stopped, another worker is gone ({str(e).splitlines()[0][:200]})",
              file=sys.stderr)
        return EXIT_WORKER_DIED
    if result.smoke is not None and not result.smoke.passed:
        if args.gpus is not None and args.gpus > 1:
            return 1  # the workers have said why
        message = (f"{result.smoke.failure_message()} Nothing long should start until this passes "
                   f"(details: {result.run_dir / 'train.log'}).")
        report_worker_error(message)
        if ctx.is_main:
            print(f"moefit train: {message}", file=sys.stderr)
        return 1
    return 0
