"""Write a Llama 4 checkpoint at a preset's real widths with a few decoder layers, through transformers itself
(`Llama4ForCausalLM(config).save_pretrained`), with moefit's shipped tokenizer: the real loading path at real widths.

    python benchmarks/width_checkpoint.py OUT_DIR [--preset llama4-scout] [--layers 2] [--device cuda]
        [--expert-intermediate N] [--mlp-intermediate N]   (narrower experts / dense MLPs, e.g. to fit a CPU host)

llama4-scout: hidden 5120, 40/8 heads of 128, 16 routed experts of 8192 + a shared one, top-1, every layer MoE
(2 layers: 8.9 GB). llama4-maverick: the same widths with 128 routed experts in every other layer, dense MLPs of
16384 between (2 layers: one dense, one MoE, about 33 GB). The vocabulary is the shipped tokenizer's (so the
shipped chat data trains it). Random bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--preset", default="llama4-scout", choices=["llama4-scout", "llama4-maverick"])
    ap.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is faster)")
    ap.add_argument("--expert-intermediate", type=int, help="instead of the preset's intermediate_size")
    ap.add_argument("--mlp-intermediate", type=int, help="instead of the preset's intermediate_size_mlp")
    args = ap.parse_args()
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from moefit.assets import tiny_model_dir
    from moefit.data import load_tokenizer
    from moefit.plan.model_facts import PRESETS_DIR

    values = json.loads((PRESETS_DIR / f"{args.preset}.json").read_text())
    text = values.get("text_config", values)
    tok_dir = tiny_model_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, args.out / f.name)
    tok = load_tokenizer(args.out)
    keep = {k: v for k, v in text.items() if k in Llama4TextConfig().to_dict() and k != "model_type"}
    keep.update(num_hidden_layers=args.layers, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    if args.expert_intermediate:
        keep["intermediate_size"] = args.expert_intermediate
    if args.mlp_intermediate:
        keep["intermediate_size_mlp"] = args.mlp_intermediate
    for key in ("no_rope_layers", "layer_types"):
        if isinstance(keep.get(key), list):
            keep[key] = keep[key][:args.layers]
    if isinstance(keep.get("moe_layers"), list):
        keep["moe_layers"] = [i for i in keep["moe_layers"] if i < args.layers]
    config = Llama4TextConfig(**keep)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Llama4ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.out, max_shard_size="2GB")
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(f"wrote {args.out}: {args.layers} layers, hidden {config.hidden_size}, {config.num_local_experts} experts, "
          f"vocab {config.vocab_size}, {size / 1e9:.2f} GB of safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
