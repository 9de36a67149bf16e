"""`moefit eval`: parse, call moefit.evaluate.evaluate_run, print base vs fine-tuned."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Held-out loss and perplexity of the base model and of the fine-tuned one (base + the run's adapter), side by
side. By default on the run's own held-out split (data.eval, or the split the trainer made with its seed);
--data FILE evaluates on another file, through the same chat template, loss mask and max_length."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="held-out loss/perplexity: base vs fine-tuned",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `moefit train`")
    p.add_argument("--data", metavar="FILE", help="held-out data file (default: the run's held-out split)")
    p.add_argument("--batch-size", type=int, help="sequences per forward (default: the run's train.batch_size)")
    p.add_argument("--max-batches", type=int, help="evaluate only the first N batches")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ..errors import MoefitError
    from ..evaluate import evaluate_run, format_result

    for name in ("batch_size", "max_batches"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise MoefitError(f"--{name.replace('_', '-')} must be at least 1, got {v}.")
    result = evaluate_run(args.run_dir, data=args.data, batch_size=args.batch_size, max_batches=args.max_batches,
                          device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(format_result(result)))
    return 0
