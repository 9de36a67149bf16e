"""One rank of tests/test_layer_graphs.py's data-parallel check (torchrun, gloo): the tiny Llama 4 MoE wrapped for
data parallelism as the trainer wraps it, two micro-steps per optimizer step (the ranks' gradients summed after the
second), once through torch's checkpoint and once with each layer's first pass, recomputation and backward stood
in for graph replays (LayerGraphs(stand_in=True, backward=True): the first micro-step's backward eager, then
captured, the second's replayed), and once with the layers' saved inputs offloaded (train.offload_checkpoints):
the summed LoRA gradients must be the same bit for bit, and equal on the ranks.
argv[1]: a folder holding the tiny config; rank 0 writes `ok` there."""

import sys
from pathlib import Path

import torch

from moefit.parallel.data_parallel import grad_sync, wrap_model
from moefit.parallel.dist import init_distributed
from tests.test_layer_graphs import built


def gradients(folder: Path, graphs: bool, rank: int, offloaded: bool = False) -> dict[str, torch.Tensor]:
    model = built(folder, keep=True, graphs=graphs, backward=True)
    if offloaded:  # train.offload_checkpoints: the saved inputs in (stood-in) host memory, the inner backward
        model.enable_gradient_checkpointing(keep_routed_gate_up=True, offload_checkpoints=True)
    wrapped = wrap_model(model, ctx)
    gen = torch.Generator().manual_seed(rank)
    for i in range(2):
        ids = torch.randint(3, 256, (2, 24), generator=gen)
        torch.manual_seed(100 * rank + i)
        with grad_sync(wrapped, sync=i == 1):
            wrapped(ids, labels=ids).loss.backward()
    if graphs:
        stats = model.layer_graphs.stats()
        assert stats["replayed"] == 6 and not stats["eager"], stats
        assert stats["backward"] == {"replayed": 3, "eager": {}, "disabled": None}, stats
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    ctx = init_distributed("cpu")
    plain, replayed = gradients(folder, False, ctx.rank), gradients(folder, True, ctx.rank)
    offloaded = gradients(folder, False, ctx.rank, offloaded=True)
    assert plain.keys() == replayed.keys() == offloaded.keys() and len(plain) > 10
    differ = [k for k in plain if not torch.equal(plain[k], replayed[k]) or not torch.equal(plain[k], offloaded[k])]
    assert not differ, differ
    # summed: every rank holds the same gradients (rank 0's copy compared on each rank)
    for name, g in sorted(replayed.items()):
        theirs = g.clone()
        torch.distributed.broadcast(theirs, src=0)
        assert torch.equal(theirs, g), name
    assert any(g.abs().sum() > 0 for k, g in replayed.items() if k.endswith("lora_B"))
    torch.distributed.destroy_process_group()
    if ctx.rank == 0:
        (folder / "ok").write_text("ok")
