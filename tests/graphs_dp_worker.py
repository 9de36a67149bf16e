"""One rank of tests/test_layer_graphs.py's data-parallel check (torchrun, gloo): the tiny Llama 4 MoE wrapped in
DistributedDataParallel as the trainer wraps it, two micro-steps per optimizer step (the first without the
gradient sync), once through torch's checkpoint and once with each layer's first pass stood in for a graph
replay (LayerGraphs(stand_in=True)): the summed LoRA gradients must be the same bit for bit. With
engine.backward_graphs asked for, the backward stays eager under DistributedDataParallel (it reduces from
autograd's accumulation hooks, which a replay would skip), and says so. argv[1]: a folder holding the tiny config;
rank 0 writes `ok` there."""

import sys
from pathlib import Path

import torch

from moefit.parallel.data_parallel import grad_sync, wrap_model
from moefit.parallel.dist import init_distributed
from tests.test_layer_graphs import built


def gradients(folder: Path, graphs: bool, rank: int) -> dict[str, torch.Tensor]:
    model = built(folder, keep=True, graphs=graphs, backward=True)
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
        assert stats["backward"] == {"replayed": 0, "eager": {"data parallel": 6}, "disabled": None}, stats
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    ctx = init_distributed("cpu")
    plain, replayed = gradients(folder, False, ctx.rank), gradients(folder, True, ctx.rank)
    assert plain.keys() == replayed.keys() and len(plain) > 10
    differ = [k for k in plain if not torch.equal(plain[k], replayed[k])]
    assert not differ, differ
    torch.distributed.destroy_process_group()
    if ctx.rank == 0:
        (folder / "ok").write_text("ok")
