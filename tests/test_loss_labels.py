"""The loss's label selection (MoefitCausalLM.forward -> label_rows): the same rows and the same loss and
gradients as selecting with a boolean mask on the hidden states, whatever the labels' device; labels in host memory
are selected there (on a GPU: no host sync in the micro-step, tests/test_gpu.py)."""

from __future__ import annotations

import torch

import moefit
from moefit.labels import IGNORE_INDEX
from moefit.models.causal_lm import label_rows
from moefit.models.loss import chunked_cross_entropy_sum


def test_label_rows_are_the_shifted_unmasked_positions():
    labels = torch.tensor([[5, IGNORE_INDEX, 7, 8], [1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    rows, y = label_rows(labels, torch.device("cpu"))
    # position t of row b predicts labels[b, t + 1]: hidden rows b * 4 + t
    assert rows.tolist() == [1, 2, 4] and y.tolist() == [7, 8, 2]
    rows, y = label_rows(torch.full((2, 3), IGNORE_INDEX), torch.device("cpu"))
    assert rows.numel() == 0 and y.numel() == 0


def test_forward_loss_and_gradients_equal_the_boolean_mask_selection():
    torch.manual_seed(0)
    model = moefit.models.load_model("tiny")
    from moefit.config import LoraConfig
    from moefit.lora import add_lora

    add_lora(model, cfg=LoraConfig(r=4))
    ids = torch.randint(0, model.config.vocab_size, (3, 24))
    labels = ids.clone()
    labels[0, :10] = IGNORE_INDEX  # a masked prompt
    labels[2, 17:] = IGNORE_INDEX  # padding
    params = [p for p in model.parameters() if p.requires_grad]

    out = model(ids, labels=labels)
    out.loss_sum.backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    hidden = model.hf.model(input_ids=ids, use_cache=False).last_hidden_state
    mask = labels[:, 1:] != IGNORE_INDEX
    want = chunked_cross_entropy_sum(hidden[:, :-1][mask], model.hf.lm_head.weight, labels[:, 1:][mask],
                                     model.loss_chunk)
    want.backward()
    assert out.num_tokens == int(mask.sum()) == 3 * 23 - 9 - 7
    assert torch.equal(out.loss_sum, want)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params, strict=True))
