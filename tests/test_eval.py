"""`moefit eval`: held-out loss of base vs fine-tuned, token-weighted, on the run's split or a given file."""

from __future__ import annotations

import json
import math

import pytest
import torch

import moefit
from moefit.assets import chat_eval_path, tiny_model_dir
from moefit.cli import main
from moefit.config import LoraConfig, RunConfig, TrainConfig, save_config
from moefit.data import build_datasets, iterate_batches, load_tokenizer
from moefit.errors import DataError
from moefit.evaluate import evaluate_run, heldout_loss
from moefit.lora import add_lora, save_adapter
from tests.test_export import write_base


def chat_run(tmp, steps: int = 12):
    """A run trained by hand on the shipped chat data (the trainer's recipe, shortened)."""
    base = write_base(tmp / "base")
    run = tmp / "run"
    run.mkdir()
    cfg = RunConfig(model=str(base), lora=LoraConfig(r=8, alpha=16.0, dropout=0.0),
                    train=TrainConfig(precision="fp32", max_length=128, batch_size=4))
    save_config(cfg, run / "config.yaml")
    tok = load_tokenizer(str(base))
    bundle = build_datasets(cfg.data, tok, max_length=128, seed=cfg.train.seed)
    model = moefit.load_model(str(base), dtype=torch.float32)
    params = add_lora(model, cfg=cfg.lora)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    batches = iterate_batches(bundle.train, 4, seed=0, pad_id=tok.pad_token_id)
    for _ in range(steps):
        batch, _pos = next(batches)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, run)
    return run, bundle, tok


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return chat_run(tmp_path_factory.mktemp("eval"))


def test_finetuned_below_base_on_heldout(trained):
    run, bundle, tok = trained
    result = evaluate_run(run, device="cpu")
    assert result["finetuned"]["loss"] < result["base"]["loss"]
    assert result["sequences"] == len(bundle.eval)
    expected_tokens = sum(sum(1 for y in s["labels"][1:] if y != -100) for s in bundle.eval)
    assert result["base"]["tokens"] == result["finetuned"]["tokens"] == expected_tokens
    assert math.isclose(result["base"]["perplexity"], math.exp(result["base"]["loss"]), rel_tol=1e-9)


def test_loss_is_token_weighted(trained):
    """Batching must not change the number: batch size 1 and 3 give the same token-weighted loss."""
    run, bundle, tok = trained
    model = moefit.load_model(moefit.load_config(run / "config.yaml").model, dtype=torch.float32)
    seqs = bundle.eval[:5]
    a = heldout_loss(model, seqs, 1, tok.pad_token_id, torch.device("cpu"))
    b = heldout_loss(model, seqs, 3, tok.pad_token_id, torch.device("cpu"))
    assert a[1] == b[1] and abs(a[0] - b[0]) < 1e-5
    per = [heldout_loss(model, [s], 1, tok.pad_token_id, torch.device("cpu")) for s in seqs]
    weighted = sum(loss * n for loss, n in per) / sum(n for _, n in per)
    assert abs(weighted - a[0]) < 1e-5


def test_cli_with_data_file(trained, tmp_path, capsys):
    run, _, _ = trained
    assert main(["eval", str(run), "--data", str(chat_eval_path()), "--max-batches", "2", "--batch-size", "2",
                 "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sequences"] == 4 and result["data"] == str(chat_eval_path())
    assert main(["eval", str(run), "--data", str(tmp_path / "missing.jsonl"), "--device", "cpu"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_no_heldout_split_is_an_error(trained, tmp_path):
    run, _, _ = trained
    cfg = moefit.load_config(run / "config.yaml")
    cfg.data.train, cfg.data.eval_fraction = str(chat_eval_path()), 0.0
    save_config(cfg, run / "config.yaml")
    try:
        with pytest.raises(DataError, match="no held-out sequences"):
            evaluate_run(run, device="cpu")
    finally:
        cfg.data.train, cfg.data.eval_fraction = None, 0.1
        save_config(cfg, run / "config.yaml")


@pytest.mark.skipif(not (tiny_model_dir() / "model.safetensors").is_file(), reason="embedded tiny model not built")
def test_embedded_default_run(tmp_path, capsys):
    """The acceptance on the embedded default: `moefit train` (shortened) then `moefit eval` on its run."""
    moefit.train(None, output_dir=str(tmp_path / "run"), max_steps=8, max_length=128, grad_accum=1,
                 eval_every=100, save_every=100, echo=False)
    assert main(["eval", str(tmp_path / "run"), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["finetuned"]["loss"] < result["base"]["loss"]
