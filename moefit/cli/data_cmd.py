"""`moefit data check FILE`: validate a data file and show what the model would learn from it."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import TINY_MODEL


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="check a data set before training on it",
                              description="Work with data sets.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    c = sub.add_parser("check", help="validate a JSONL/JSON file (or folder) and summarise it",
                       description="Validate every record (bad lines are listed with file and line), then print "
                       "the format, counts, length percentiles and what truncation would cut. "
                       "Exit code 0 when every record is valid, 1 when some are not.")
    c.add_argument("file", help="a .jsonl or .json file, or a folder of them")
    c.add_argument("--model", default=TINY_MODEL,
                   help="model folder or hub id whose tokenizer and chat template to use (default: the embedded "
                   "tiny model)")
    c.add_argument("--format", default="auto",
                   choices=["auto", "text", "instruction", "chat", "sharegpt", "prompt_completion"],
                   help="force a record format (default: detected per file)")
    c.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (default 2048)")
    c.add_argument("--loss-on", default="assistant", choices=["assistant", "all", "last_turn"],
                   help="which tokens carry loss (default: the assistant turns)")
    c.add_argument("--system-prompt", default=None, help="system prompt added to conversations without one")
    c.add_argument("--show", type=int, default=0, metavar="N",
                   help="render N samples with the trained tokens marked")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=_check)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _check(args: argparse.Namespace) -> int:
    from ..data import check_data, load_tokenizer
    from ..data.check import show_lines, summary_lines
    from ..errors import DataError

    if args.max_length < 2:
        raise DataError(f"--max-length must be at least 2, got {args.max_length}.")
    tok = load_tokenizer(args.model)
    report = check_data(args.file, tok, args.format, args.max_length, args.loss_on, args.system_prompt)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(summary_lines(report)))
        if args.show:
            print("\n".join(show_lines(report, tok, args.show, color=sys.stdout.isatty())))
    return 0 if report.valid else 1
