"""Merged and adapter exports of a tiny trained run, loaded by plain transformers and by PEFT.

A run is made by hand: a tiny Llama 4 checkpoint written by transformers (with the shipped tiny tokenizer),
loaded NF4 by moefit, LoRA on attention + shared expert + routed experts, a few AdamW steps on random tokens,
`save_adapter` + config.yaml. Then: the merged export loaded with `AutoModelForCausalLM` (and the
ConditionalGeneration class for that layout) gives moefit's logits (fp32, relative error < 1e-3), the PEFT
adapter on the tiny base gives moefit's logits on the unquantized base.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Llama4ForCausalLM, Llama4TextConfig

import moefit
from moefit.assets import tiny_model_dir
from moefit.config import LoraConfig, RunConfig, TrainConfig, save_config
from moefit.errors import MoefitError
from moefit.lora import add_lora, load_adapter, lora_parameters, save_adapter
from tests.families import TOKENIZER_FILES, rel, tokenizer_ids

TEXT = dict(hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_chunk_size=16,
            max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=1, use_qk_norm=True,
            tie_word_embeddings=False, no_rope_layers=[1, 0])
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)


def _ids(tok_ids: dict) -> dict:
    return {**tokenizer_ids(), **tok_ids}


def write_base(path: Path, conditional: bool = False, seed: int = 0) -> Path:
    """A tiny Llama 4 (text or ConditionalGeneration layout) in fp32, with the shipped tiny tokenizer."""
    torch.manual_seed(seed)
    text = Llama4TextConfig(**_ids(TEXT))
    if conditional:
        from transformers import Llama4Config, Llama4ForConditionalGeneration

        cfg = Llama4Config(text_config=text.to_dict(), vision_config=VISION)
        model = Llama4ForConditionalGeneration(cfg).float()
    else:
        model = Llama4ForCausalLM(text).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir() / f, path / f)
    return path


def make_run(tmp: Path, conditional: bool = False, steps: int = 4, expert_r: int | None = 4,
             quantization: str = "nf4", base: Path | None = None) -> Path:
    """Train a few steps by hand and write a run directory the way the trainer does (on `base`, or on a tiny
    Llama 4 written here)."""
    base = base or write_base(tmp / ("base-cg" if conditional else "base"), conditional)
    run = tmp / ("run-cg" if conditional else "run")
    run.mkdir()
    cfg = RunConfig(model=str(base), lora=LoraConfig(r=4, alpha=8.0, dropout=0.0, expert_r=expert_r),
                    train=TrainConfig(precision="fp32", max_length=64))
    cfg.quantization.weights = quantization
    save_config(cfg, run / "config.yaml")
    model = moefit.load_model(str(base), quantization=quantization, dtype=torch.float32, quant=cfg.quantization)
    params = add_lora(model, cfg=cfg.lora)
    opt = torch.optim.AdamW(params.values(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(6, model.config.vocab_size, (2, 32), generator=g)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, run)
    return run


def trained_model(run: Path, quantization: str = "nf4"):
    cfg = moefit.load_config(run / "config.yaml")
    model = moefit.load_model(cfg.model, quantization=quantization, dtype=torch.float32, quant=cfg.quantization,
                              attn_implementation="eager")
    load_adapter(model, run)
    return model


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
    return tiny_run


def _ids_batch(vocab: int) -> torch.Tensor:
    return torch.randint(6, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def test_merged_export_matches_moefit_forward(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = trained_model(run_dir)
    assert any(p.abs().sum() > 0 for n, p in lora_parameters(model).items() if n.endswith("lora_B")), \
        "training left LoRA B at zero: the test would not test the merge"
    out = tmp_path / "merged"
    report = moefit.export(run_dir, out, merge=True, dtype="float32", max_shard_size="200KB")
    assert report.shards > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_dir = Path(moefit.load_config(run_dir / "config.yaml").model)
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        base_keys = set(f.keys())
    assert set(index["weight_map"]) == base_keys  # same tensor names as the base
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForCausalLM"]
    for f in TOKENIZER_FILES:
        assert (out / f).is_file()

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Llama4ForCausalLM"
    ids = _ids_batch(hf.config.vocab_size)
    with torch.no_grad():
        got = hf(ids).logits
        expected = model(ids, return_logits=True).logits
        base_logits = moefit.load_model(str(base_dir), dtype=torch.float32, attn_implementation="eager")(
            ids, return_logits=True).logits
    assert rel(got, expected) < 1e-3
    assert rel(base_logits, expected) > 10 * rel(got, expected)  # the adapter changed the model: merge is seen


def test_merged_export_into_original_base(run_dir, tmp_path):
    """--base: the delta goes into the original weights; equals moefit's unquantized forward with the adapter."""
    from transformers import AutoModelForCausalLM

    base_dir = Path(moefit.load_config(run_dir / "config.yaml").model)
    out = tmp_path / "merged-base"
    report = moefit.export(run_dir, out, base=base_dir, dtype="float32")
    assert report.base_values == "original weights"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _ids_batch(hf.config.vocab_size)
    with torch.no_grad():
        got = hf(ids).logits
        expected = trained_model(run_dir, quantization="none")(ids, return_logits=True).logits
    assert rel(got, expected) < 1e-3


def test_merged_export_conditional_generation(tmp_path):
    from transformers import Llama4ForConditionalGeneration

    run = make_run(tmp_path, conditional=True, steps=3)
    out = tmp_path / "merged-cg"
    report = moefit.export(run, out, dtype="float32")
    base_dir = Path(moefit.load_config(run / "config.yaml").model)
    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        base = {k: f.get_tensor(k) for k in f.keys()}
    vision = [k for k in base if k.startswith(("vision_model.", "multi_modal_projector."))]
    assert vision and report.copied_through == len(vision)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    for k in vision:  # copied through unchanged
        with safe_open(str(out / index["weight_map"][k]), "pt") as f:
            assert torch.equal(f.get_tensor(k), base[k])
    hf = Llama4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    ids = _ids_batch(hf.config.text_config.vocab_size)
    with torch.no_grad():
        # the text path of the class (its own forward trips over a text-only output in transformers 5.24)
        got = hf.language_model(input_ids=ids).logits
        expected = trained_model(run)(ids, return_logits=True).logits
    assert rel(got, expected) < 1e-3


def _check_peft_adapter_export(run_dir: Path, out: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = moefit.export(run_dir, out, merge=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert cfg["target_parameters"]  # routed experts through PEFT's parameter targets
    assert report.tensors_written > 0
    base_dir = Path(moefit.load_config(run_dir / "config.yaml").model)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, out).eval()
    n_loaded = sum(1 for n, p in peft_model.named_parameters() if "lora_" in n and p.abs().sum() > 0)
    assert n_loaded == report.tensors_written
    ids = _ids_batch(base.config.vocab_size)
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
        expected = trained_model(run_dir, quantization="none")(ids, return_logits=True).logits
    assert rel(got, expected) < 1e-3
    return cfg


def test_peft_adapter_export_matches(run_dir, tmp_path):
    _check_peft_adapter_export(run_dir, tmp_path / "peft")


def test_peft_adapter_export_with_a_smaller_expert_rank_matches(tmp_path):
    """expert_r != r: the expert ranks travel in rank_pattern keyed by parameter names, which PEFT applies
    (despite its warning that the keys match no targeted module)."""
    cfg = _check_peft_adapter_export(make_run(tmp_path / "run", expert_r=2), tmp_path / "peft")
    assert sorted(set(cfg["rank_pattern"].values())) == [2, 4]  # down_proj: expert_r; gate_up_proj: 2 * expert_r


def test_export_refuses_non_empty_out_and_wrong_base(run_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(MoefitError, match="not empty"):
        moefit.export(run_dir, out)
    other = tmp_path / "other"
    torch.manual_seed(0)
    Llama4ForCausalLM(Llama4TextConfig(**_ids({**TEXT, "hidden_size": 32, "head_dim": 8}))).save_pretrained(other)
    with pytest.raises(MoefitError, match="not the model the run was trained on"):
        moefit.export(run_dir, tmp_path / "x", base=other)
    with pytest.raises(MoefitError, match="no adapter_config.json"):
        moefit.export(tmp_path, tmp_path / "y")


def test_cli_export(run_dir, tmp_path, capsys):
    from moefit.cli import main
    from moefit.export import parse_size

    assert main(["export", str(run_dir), "--merge", "--out", str(tmp_path / "m"), "--max-shard-size", "1MB",
                 "--workers", "2"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "merged checkpoint written" in out and "NF4-dequantized" in out
    assert re.search(r"wrote \d+\.\d\d GB in \d+\.\d s: [\d.e-]+ GB/s \(2 workers, merge on cpu\)", out), out
    assert re.search(r"export: .* GB \(100%\), [\d,]+ MB/s", captured.err), captured.err  # progress
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert main(["export", str(run_dir), "--adapter", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert main(["export", str(run_dir), "--merge", "--out", str(tmp_path / "a")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("123") == 123
    with pytest.raises(MoefitError, match="expected a number of bytes"):
        parse_size("lots")
