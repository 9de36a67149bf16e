"""Does the merged export load in transformers and give moefit's logits? One run directory, its base checkpoint and
its merged export (`moefit export RUN --merge --out MERGED`):

    python benchmarks/merged_logits_check.py RUN BASE MERGED [--device cuda] [--tokens 64]

For each compute dtype (bfloat16, float32): transformers' AutoModelForCausalLM on MERGED against moefit on BASE
(NF4, the run's adapter loaded), the same random token ids. Prints the relative error of all logits, the median
and the largest per-token relative error, the fraction of tokens whose error exceeds 5 % and the fraction of equal
greedy tokens. A bug in the merge shows in every token; a token whose routed expert flips between two near-equal
router scores (the merged weights are rounded to bf16) shows alone, and rarely in float32. So the routers' top-k
choices are recorded in both models (forward hooks on every router: a Linear with one output per expert) and the
errors are also given over the tokens that every layer routed to the same experts in both. PASS (exit 0) when
those tokens are within ALIKE_LIMIT and at least MIN_ROUTED_ALIKE of the tokens are routed alike.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# The merged weights are rounded to bf16 once; moefit adds the LoRA delta in the compute dtype. What that rounding
# may do to the logits of a token routed the same way in both (after two 5120-wide layers on CPU in fp32: at most
# 1.45 %, benchmarks/merged_check_cpu.sh), with room; and the share of tokens that may flip their routing.
ALIKE_LIMIT = {torch.float32: 0.02, torch.bfloat16: 0.05}
MIN_ROUTED_ALIKE = 0.9


def routed_blocks(model: torch.nn.Module, experts: int) -> list[tuple[torch.nn.Module, torch.nn.Linear]]:
    """(MoE block, its router): the router is a Linear child named router or gate with one output per expert.
    The block's input is what the router reads (moefit's block applies the router's weight itself, so a hook on
    the router module would not fire)."""
    out = []
    for block in model.modules():
        for name in ("router", "gate"):
            r = getattr(block, name, None)
            if isinstance(r, torch.nn.Linear) and r.out_features == experts:
                out.append((block, r))
                break
    return out


def logits_of(load, ids: torch.Tensor, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [T, V] and each token's top-k experts by router logit [T, layers, k] (sorted)."""
    model = load()
    chosen: list[torch.Tensor] = []

    def record(router: torch.nn.Linear):
        def hook(module, args):
            x = args[0].reshape(-1, router.in_features)
            scores = torch.nn.functional.linear(x, router.weight.to(x.dtype),
                                                None if router.bias is None else router.bias.to(x.dtype))
            chosen.append(scores.float().topk(top_k, dim=-1).indices.sort(-1).values.cpu())
        return hook

    blocks = routed_blocks(model, experts)
    if not blocks:
        raise SystemExit("no MoE block with a router found: cannot compare the routing")
    hooks = [block.register_forward_pre_hook(record(r)) for block, r in blocks]
    with torch.no_grad():
        out = model(ids, return_logits=True) if hasattr(model, "engine_config") else model(ids)
    for h in hooks:
        h.remove()
    logits = out.logits.float().cpu()[0]
    route = torch.stack(chosen, 1) if chosen else torch.zeros(logits.shape[0], 0, top_k, dtype=torch.long)
    del model, out
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return logits, route


def compare(got: torch.Tensor, want: torch.Tensor, route_got: torch.Tensor, route_want: torch.Tensor) -> dict:
    if route_got.shape != route_want.shape:
        raise SystemExit(f"the two models route in different numbers of layers ({route_got.shape[1]} and "
                         f"{route_want.shape[1]}): their routing cannot be compared")
    per_token = (got - want).norm(dim=-1) / want.norm(dim=-1)
    alike = (route_got == route_want).flatten(1).all(1)
    return {"relative_error": ((got - want).norm() / want.norm()).item(),
            "token_median": per_token.median().item(), "token_max": per_token.max().item(),
            "tokens_over_5pct": (per_token > 0.05).float().mean().item(),
            "greedy_equal": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
            "routers": route_got.shape[1], "routed_alike": alike.float().mean().item(),
            "alike_median": per_token[alike].median().item() if alike.any() else float("nan"),
            "alike_max": per_token[alike].max().item() if alike.any() else float("nan"),
            "other_min": per_token[~alike].min().item() if (~alike).any() else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("base")
    ap.add_argument("merged", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtypes", default="bfloat16,float32", help="compute dtypes to compare, in order")
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    import moefit
    from moefit.lora import load_adapter

    config = AutoConfig.from_pretrained(args.merged).get_text_config()
    vocab = config.vocab_size
    experts = next(getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                   if getattr(config, k, None))
    top_k = config.num_experts_per_tok
    ids = torch.randint(10, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    failed = False
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        def hf_model(dtype=dtype):
            return AutoModelForCausalLM.from_pretrained(args.merged, dtype=dtype).to(args.device).eval()

        def moefit_model(dtype=dtype):
            model = moefit.load_model(args.base, quantization="nf4", dtype=dtype, device=args.device)
            load_adapter(model, args.run)
            return model

        got, route_got = logits_of(hf_model, ids, experts, top_k)
        want, route_want = logits_of(moefit_model, ids, experts, top_k)
        r = compare(got, want, route_got, route_want)
        print(f"{str(dtype)[6:]:>8}: merged (transformers) vs moefit (NF4 + adapter) logits: relative error "
              f"{r['relative_error']:.4f}; per token median {r['token_median']:.4f}, max {r['token_max']:.4f}, "
              f"{r['tokens_over_5pct']:.1%} of tokens over 5 %; greedy tokens equal: {r['greedy_equal']:.3f}; "
              f"tokens routed alike in all {r['routers']} routers: {r['routed_alike']:.1%} (their error: median "
              f"{r['alike_median']:.4f}, max {r['alike_max']:.4f}; the others' least: {r['other_min']:.4f})",
              flush=True)
        limit = ALIKE_LIMIT[dtype]
        ok = r["alike_max"] <= limit and r["routed_alike"] >= MIN_ROUTED_ALIKE
        failed = failed or not ok
        print(f"{'PASS' if ok else 'FAIL'} {str(dtype)[6:]}: tokens routed alike off by at most {limit:.0%} "
              f"({r['alike_max']:.2%}), at least {MIN_ROUTED_ALIKE:.0%} of tokens routed alike "
              f"({r['routed_alike']:.1%})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
