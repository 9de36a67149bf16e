"""`moefit` command line: each subcommand lives in its own module here and only parses, calls the library, prints."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from ..errors import MoefitError, WorkersFailed

# Subcommand modules, in the order `moefit --help` lists them. Each defines `register(subparsers)`.
COMMANDS = ["plan", "data", "train", "export", "generate", "eval", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moefit",
        description="QLoRA fine-tuning of Mixture-of-Experts LLMs on the fewest GPUs. "
        "Plan a run before renting a GPU, check the data, smoke-test, train, export, try it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `moefit COMMAND --help` for the options of each command. "
        "`moefit train` with no argument trains the embedded tiny model on the shipped data set (CPU, minutes).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"moefit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module_name = f"{__name__}.{name}_cmd"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(sub)
    return parser


# bitsandbytes' CPU kernels and torch each run an OpenMP pool; with the default (spinning) wait policy the two
# pools fight for the cores and a tiny NF4 dequantize takes ~7 ms instead of ~0.03 ms (measured on 2 cores).
# It must be set before torch is first imported, so the command line sets it (an explicit user setting wins);
# a library user on CPU sets it in the environment (importing moefit changes no process state).
OMP_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: list[str] | None = None) -> int:
    for key, value in OMP_SETTINGS.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except WorkersFailed as e:  # several processes (--gpus): the workers and the launcher have said why
        return e.exit_code
    except MoefitError as e:
        print(f"moefit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moefit {args.command}: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moefit ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
