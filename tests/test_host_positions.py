"""Packed rows told apart from the position ids in host memory (moefit.models.host_positions): the same answer and
the same logits as transformers' check on the device, which reads the GPU back once per mask."""

from __future__ import annotations

import pytest
import torch

from moefit.models import host_positions
from tests.families import CASES, FAMILY_CASES, write_checkpoint

POSITIONS = {
    "one sample per row": torch.arange(10).expand(2, 10),
    "packed row": torch.cat([torch.arange(4), torch.arange(6)])[None],
    "one packed row of two": torch.stack([torch.arange(10), torch.cat([torch.arange(3), torch.arange(7)])]),
    "row starting late": torch.arange(5, 15)[None],  # contiguous, not from 0: one sample to transformers
    "gap without restart": torch.tensor([[0, 1, 2, 7, 8, 9]]),  # a break transformers counts, no restart at 0
    "sample of one token": torch.tensor([[0, 1, 0, 0, 1, 2]]),
}


def _stock():
    from transformers import masking_utils

    host_positions.install()
    assert masking_utils.find_packed_sequence_indices is host_positions.find_packed_sequence_indices
    return host_positions._stock


@pytest.mark.parametrize("name", sorted(POSITIONS))
def test_host_answer_is_transformers_answer(name):
    """Inside a forward that knows its positions on the host: None where transformers says one sample per row,
    else the same sample indices; outside one, transformers' own check."""
    stock = _stock()
    pos = POSITIONS[name]
    want = stock(pos)
    with host_positions.known(pos, tuple(pos.shape)):
        got = host_positions.find_packed_sequence_indices(pos.clone())
    assert (got is None) == (want is None), name
    if want is not None:
        assert torch.equal(got, want), name
    outside = host_positions.find_packed_sequence_indices(pos)
    assert (outside is None) == (want is None)


def test_default_positions_are_one_sample_per_row():
    """No position ids given: transformers makes its own [1, T] row 0..T-1 and expands it; both count as known."""
    _stock()
    own = torch.arange(9)[None]
    with host_positions.known(None, (3, 9)):
        assert host_positions.find_packed_sequence_indices(own) is None
        assert host_positions.find_packed_sequence_indices(own.expand(3, 9)) is None
        assert host_positions.current(torch.arange(8)[None]) is None  # another length: not this forward's


def test_positions_on_the_device_side_are_refused():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA for a device tensor")
    with pytest.raises(ValueError, match="host memory"):
        with host_positions.known(torch.arange(4, device="cuda")[None], (1, 4)):
            pass


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_forward_with_host_positions_never_asks_the_device(tmp_path, monkeypatch, case):
    """A packed batch and an unpacked one through `MoefitCausalLM.forward` with host position ids: transformers'
    device check is never called (it would read the GPU back), and the logits are those of the model run the
    stock way (transformers' check on the same positions)."""
    import moefit

    write_checkpoint(tmp_path, CASES[case])
    model = moefit.load_model(str(tmp_path), quantization="none", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 14), generator=g)
    packed = torch.stack([torch.arange(14), torch.cat([torch.arange(5), torch.arange(9)])])
    with torch.no_grad():
        stock = {name: model.hf(input_ids=ids, position_ids=None if pos is None else pos.clone(),
                                use_cache=False).logits
                 for name, pos in (("packed", packed), ("plain", None))}

        def device_check(_):
            raise AssertionError("transformers' packed-rows check ran on the device")

        monkeypatch.setattr(host_positions, "_stock", device_check)
        for name, pos in (("packed", packed), ("plain", None)):
            got = model(ids, position_ids=pos, return_logits=True).logits
            assert (got - stock[name]).abs().max().item() < 1e-5, (case, name)


def test_sink_attention_backward_recomputation_reuses_the_host_answer(tmp_path, monkeypatch):
    """gpt-oss with checkpointing: the backward recomputes the attention outside the forward (no host answer in
    scope there) and must reuse the forward's, not read the device's position ids back; gradients as without."""
    import moefit
    from moefit.lora import add_lora, lora_parameters
    from moefit.models import sink_attention

    write_checkpoint(tmp_path, CASES["gpt_oss"])
    model = moefit.load_model(str(tmp_path), quantization="none", dtype=torch.float32)
    add_lora(model, r=4, alpha=8, dropout=0.0)
    model.enable_gradient_checkpointing()
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, 20), generator=g)
    positions = torch.cat([torch.arange(9), torch.arange(11)])[None]

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, position_ids=positions).loss_sum.backward()
        return {n: p.grad.clone() for n, p in lora_parameters(model).items()}

    want = grads()
    calls = []
    monkeypatch.setattr(sink_attention, "_restarts_on_device", lambda p: calls.append(p) or True)
    got = grads()
    assert not calls
    assert all(torch.equal(got[n], want[n]) for n in want)
