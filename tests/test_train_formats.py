"""Every data format the pipeline reads trains the embedded tiny model end to end through `moefit.train`
(real NF4 weights, LoRA on attention, shared and routed experts, the real loop)."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

import moefit
from tests.test_data_formats import RECORDS
from tests.test_data_pipeline import _records
from tests.test_data_support import write_jsonl


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_format_trains_the_embedded_tiny_model(tmp_path, fmt):
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", _records(fmt, 16))
    result = moefit.train(None, output_dir=tmp_path / "run", echo=False, max_steps=2, grad_accum=1,
                          max_length=128, eval_every=100, save_every=100, **{"data.train": str(data),
                                                                             "data.eval": None,
                                                                             "data.eval_fraction": 0.25})
    assert result.completed and result.step == 2
    assert all(math.isfinite(x) for x in result.train_losses)
    assert math.isfinite(result.start_eval_loss) and math.isfinite(result.end_eval_loss)
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert any(".experts.gate_lora_B" in k for k in adapter)  # routed experts were trained too
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if k.endswith("lora_B"))
