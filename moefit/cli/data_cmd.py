"""`moefit data check FILE`: validate a data file and show what the model would learn from it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..config import TINY_MODEL

CONFIG_SUFFIXES = (".yaml", ".yml")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="check a data set before training on it",
                              description="Work with data sets.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    c = sub.add_parser("check", help="validate a data file (or folder, or a run config's data) and summarise it",
                       description="Validate every record (bad lines are listed with file and line), then print "
                       "the format, counts, length percentiles and what truncation would cut. Reads JSONL, JSON "
                       "(a list of records), CSV and TSV (a header row names the columns); in a folder, other files "
                       "are skipped and listed. Given a run config (.yaml), checks the data it names with its "
                       "model's tokenizer, max length, format and loss settings (options given here override them). "
                       "Exit code 0 when every record is valid and some sample is usable, 1 when not.")
    c.add_argument("file", help="a .jsonl/.json/.csv/.tsv file, a folder of them, or a run config (.yaml)")
    c.add_argument("--model", default=None,
                   help="model folder or hub id whose tokenizer and chat template to use (default: the run "
                   "config's model, else the embedded tiny model)")
    c.add_argument("--format", default=None,
                   choices=["auto", "text", "instruction", "chat", "sharegpt", "prompt_completion"],
                   help="force a record format (default: the config's data.format, else detected per file)")
    c.add_argument("--max-length", type=int, default=None,
                   help="tokens per sequence (default: the config's train.max_length, else 2048)")
    c.add_argument("--loss-on", default=None, choices=["assistant", "all", "last_turn"],
                   help="which tokens carry loss (default: the config's data.loss_on, else the assistant turns)")
    c.add_argument("--system-prompt", default=None, help="system prompt added to conversations without one")
    c.add_argument("--show", type=int, default=0, metavar="N",
                   help="render N samples with the trained tokens marked")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=_check)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _check(args: argparse.Namespace) -> int:
    from ..data import load_tokenizer
    from ..data.check import check_config_data, check_data, show_lines, summary_lines
    from ..errors import DataError

    if args.max_length is not None and args.max_length < 2:
        raise DataError(f"--max-length must be at least 2, got {args.max_length}.")
    if Path(args.file).suffix.lower() in CONFIG_SUFFIXES:
        from ..config import load_config

        cfg = load_config(args.file)
        cfg.model = args.model or cfg.model
        cfg.train.max_length = args.max_length or cfg.train.max_length
        cfg.data = dataclasses.replace(cfg.data, **{k: v for k, v in (
            ("format", args.format), ("loss_on", args.loss_on), ("system_prompt", args.system_prompt))
            if v is not None})
        tok = load_tokenizer(cfg.model)
        reports = check_config_data(cfg, tok)
        print(f"{args.file}: the run's data, with the tokenizer of {cfg.model} and max length "
              f"{cfg.train.max_length}", file=sys.stderr)
    else:
        tok = load_tokenizer(args.model or TINY_MODEL)
        reports = {"data": check_data(args.file, tok, args.format or "auto", args.max_length or 2048,
                                      args.loss_on or "assistant", args.system_prompt)}
    if args.json:
        d = {role: r.to_dict() for role, r in reports.items()}
        print(json.dumps(d["data"] if list(d) == ["data"] else d, indent=2))
    else:
        for role, report in reports.items():
            if len(reports) > 1:
                print(f"== {role} data")
            print("\n".join(summary_lines(report)))
            if args.show:
                print("\n".join(show_lines(report, tok, args.show, color=sys.stdout.isatty())))
    return 0 if all(r.valid for r in reports.values()) else 1
