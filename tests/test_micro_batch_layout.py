"""The same optimizer step laid out as different micro-batches (what `moefit plan`'s "faster:" line proposes):
with the trainer's normalisation (each micro-batch's summed loss over all label tokens of the step), the LoRA
gradients of 4 sequences are the same as 1 x 4, 2 x 2 or 4 x 1, through NF4 experts, routing and checkpointing."""

from __future__ import annotations

import pytest
import torch

import moefit
from moefit.lora import add_lora
from tests.families import randomize_lora
from tests.test_engine_parity import CONFIGS, tiny_config, write_checkpoint


def _step_grads(model, seqs: torch.Tensor, labels: torch.Tensor, micro_batch: int) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    denom = int((labels[:, 1:] != -100).sum())
    for i in range(0, seqs.shape[0], micro_batch):
        out = model(seqs[i:i + micro_batch], labels=labels[i:i + micro_batch])
        (out.loss_sum / denom).backward()
    return {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("name", ["top1-4e-norope", "top2-8e-norope"])
def test_lora_gradients_do_not_depend_on_the_micro_batch_layout(tmp_path, name):
    cfg = tiny_config(**CONFIGS[name])
    write_checkpoint(tmp_path, cfg)
    model = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.float32)
    add_lora(model, r=4, alpha=8, dropout=0.0, targets=["q", "k", "v", "o", "gate", "up", "down"])
    randomize_lora(model)
    model.enable_gradient_checkpointing(keep_routed_gate_up=True)
    model.train()
    gen = torch.Generator().manual_seed(5)
    seqs = torch.randint(3, cfg.vocab_size, (4, 20), generator=gen)
    labels = seqs.clone()
    labels[1, :7] = -100  # prompt tokens without loss: micro-batches hold different label counts
    labels[3, 12:] = -100
    one = _step_grads(model, seqs, labels, micro_batch=1)
    for micro_batch in (2, 4):
        other = _step_grads(model, seqs, labels, micro_batch)
        for n in one:
            assert torch.allclose(one[n], other[n], rtol=1e-4, atol=1e-6), (micro_batch, n)
