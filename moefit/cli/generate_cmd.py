"""`moefit generate`: parse, load the model, chat (one prompt or interactively), print."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Chat with a fine-tuned model through its chat template, tokens streamed as they are generated.

PATH is a run directory (the base model is loaded as during training, plus the final adapter), an adapter
directory written by moefit, or a model directory such as a merged export (`moefit export RUN --merge`).
With --prompt it answers once and exits; without it, it reads one message per line (/reset starts a new
conversation, /exit or Ctrl-D quits)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="chat with a run or a merged model (streamed)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_DIR|DIR", help="run directory, adapter directory or model directory")
    p.add_argument("--prompt", help="one user message; without it: interactive chat")
    p.add_argument("--system", help="system message put before the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--quantization", choices=["nf4", "none"],
                   help="how the base weights are held (default: as the run trained; nf4 for a model directory)")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ..errors import MoefitError
    from ..generate import chat_repl, generate_reply, load_chat_model

    if args.max_new_tokens < 1:
        raise MoefitError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise MoefitError("--temperature must be 0 or more and --top-p in (0, 1].")
    if args.prompt is not None and not args.prompt.strip():
        raise MoefitError("--prompt is empty: give the message to answer, or leave --prompt out to chat "
                          "interactively.")
    chat = load_chat_model(args.path, device=args.device, quantization=args.quantization)
    for note in chat.notes:
        print(f"note: {note}", file=sys.stderr)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        generate_reply(chat, messages, stream=sys.stdout, **gen)
        sys.stdout.write("\n")
        return 0
    chat_repl(chat, sys.stdin, sys.stdout, system=args.system, **gen)
    return 0
