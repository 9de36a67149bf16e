"""`moefit export`: parse, call moefit.export, print the report."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Export a trained run (RUN_DIR written by `moefit train`, or an adapter directory).

--merge writes a Hugging Face checkpoint with the base model's architecture class, config.json and tensor names
(fused experts for Llama 4; vision tower copied through for Llama4ForConditionalGeneration), sharded safetensors
with an index, the tokenizer and chat template: plain transformers, vLLM and TGI load it. It streams tensor by
tensor; host memory stays at about one tensor whatever the model size.

Which base weights the LoRA goes into:
  default      the base dequantized from NF4 exactly as during training (what the run was trained against);
  --base PATH  the original bf16 checkpoint: no NF4 rounding in the result. This is the better choice
               whenever you have the original weights.

--adapter writes the adapter alone in PEFT's format (PeftModel.from_pretrained(base, DIR)); Llama 4's routed
experts go through PEFT's target_parameters on the fused expert tensors (exact; ranks in rank_pattern)."""

EPILOG = """\
examples:
  moefit export runs/tiny-20250101-120000 --merge --out merged/
  moefit export runs/scout1 --merge --base /models/Llama-4-Scout-17B-16E-Instruct --out scout-merged/
  moefit export runs/scout1 --adapter --out scout-adapter/
  vllm serve scout-merged/                    serve the merged checkpoint"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="merged HF checkpoint (transformers/vLLM) or PEFT adapter of a run",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or adapter directory) to export")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="merge LoRA into the base weights (HF checkpoint)")
    mode.add_argument("--adapter", action="store_true", help="the adapter alone, in PEFT's format")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--base", metavar="PATH",
                   help="original base checkpoint (bf16) to merge into: better than the default NF4-dequantized "
                        "base, which carries NF4 rounding. Must be the model the run was trained on.")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the merged weights (default bfloat16)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest shard file, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--device", default="auto",
                   help="where the merge arithmetic and any decoding (NF4 round trip, FP8, MXFP4) run: auto (the "
                        "GPU when there is one; default), cuda, or cpu")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="threads reading, merging and writing pieces of the shards at once (default: one per CPU, "
                        "at most 8); host memory holds about one piece (a weight, or one expert's slice) per worker")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    p.set_defaults(func=handle)


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive number")
    return n


def handle(args: argparse.Namespace) -> int:
    from ..export import export

    report = export(args.run_dir, args.out, merge=args.merge, base=args.base, dtype=args.dtype,
                    max_shard_size=args.max_shard_size, device=args.device, overwrite=args.overwrite,
                    workers=args.workers, progress=True)
    for line in report.summary_lines():
        print(line)
    return 0
