"""Expert parallelism against one process (tests/test_expert_parallel.py): the same tiny Llama 4 MoE, every rank
its own batch. Run under torchrun with gloo: `python -m torch.distributed.run --nproc-per-node 2 tests/ep_worker.py
CASE.json OUT_DIR`; in one process, `reference(case)` gives what every rank must match."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

VOCAB = 64


def write_config(case: dict, folder: Path) -> Path:
    from transformers import Llama4TextConfig

    layers = case.get("layers", 4)
    cfg = Llama4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_local_experts=case.get("experts", 4), num_experts_per_tok=case["top_k"],
                           moe_layers=case.get("moe_layers", list(range(layers))), no_rope_layers=[1] * layers,
                           use_qk_norm=False, attention_chunk_size=64, max_position_embeddings=64,
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    folder.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    (folder / "config.json").write_text(json.dumps(d))
    return folder


def build(case: dict, folder: Path):
    """The model every process builds alike: fp32, unquantized, LoRA everywhere with random (non-zero) B."""
    from moefit.bench import build_synthetic_model
    from moefit.config import LoraConfig, QuantConfig

    lora = LoraConfig(r=4, alpha=8.0, dropout=0.0, targets=["q", "k", "v", "o", "gate", "up", "down"])
    model = build_synthetic_model(str(write_config(case, folder)), quant=QuantConfig(weights="none"), lora=lora,
                                  device="cpu", dtype=torch.float32, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if case.get("checkpointing"):  # the recomputation in backward runs the all-to-all again
        model.enable_gradient_checkpointing(keep_routed_gate_up=case.get("keep", False),
                                            offload_checkpoints=case.get("offload", False))
    model.train()
    return model


def batches(case: dict, world: int) -> list[torch.Tensor]:
    """One batch per rank. `uniform_rank`: that rank's batch is one token repeated, so every one of its tokens
    takes the same experts and the others get no row from it."""
    gen = torch.Generator().manual_seed(2)
    out = [torch.randint(3, VOCAB, (2, case.get("seq", 12)), generator=gen) for _ in range(world)]
    r = case.get("uniform_rank")
    if r is not None:
        out[r] = torch.full_like(out[r], 7)
    return out


def step(model, ids: torch.Tensor, denom: int) -> torch.Tensor:
    out = model(ids, labels=ids, return_logits=True)
    (out.loss_sum / denom).backward()
    return out.logits.detach()


def label_tokens(ids: list[torch.Tensor]) -> int:
    return sum(int(b[:, 1:].numel()) for b in ids)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference(case: dict, folder: Path, world: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model = build(case, folder)
    ids = batches(case, world)
    denom = label_tokens(ids)
    logits = [step(model, b, denom) for b in ids]
    return logits, grads(model)


def main() -> None:
    import torch.distributed as dist

    from moefit.parallel import init_distributed, shutdown_distributed
    from moefit.parallel.expert_parallel import ExpertShard, shard_experts

    case, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    init_distributed("cpu")  # gloo, as the trainer joins it
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(case, out / f"model-{rank}")
    shard = ExpertShard(rank, world, case.get("experts", 4))
    assert shard_experts(model, shard) == len(case.get("moe_layers", range(case.get("layers", 4))))
    ids = batches(case, world)
    logits = step(model, ids[rank], label_tokens(ids))
    g = grads(model)
    for name, t in g.items():  # replicated LoRA: summed over ranks as data parallelism does
        if ".experts." not in name:
            dist.all_reduce(t)
    dispatch = next(m.expert_dispatch for m in model.modules() if getattr(m, "expert_dispatch", None))
    torch.save({"logits": logits, "grads": g, "start": shard.start, "local": shard.local,
                "counts": dispatch.last_counts, "exchanges": dispatch.count_exchanges}, out / f"rank{rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
