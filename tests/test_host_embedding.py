"""quantization.embeddings_on_host: the input embedding table in host memory gives the same model (CPU here; the
device hop to a GPU is in tests/test_gpu.py), tied embeddings are refused, the planner drops the table from GPU
memory, and synthetic bench models fill it."""

from __future__ import annotations

import pytest
import torch

import moefit
from moefit.config import LoraConfig, QuantConfig, RunConfig, TrainConfig
from moefit.errors import MoefitError
from moefit.models.host_embedding import HostEmbedding
from tests.families import rel
from tests.test_engine_parity import CONFIGS, tiny_config, write_checkpoint


def test_host_embedding_model_matches_and_holds_no_embedding_parameter(tmp_path):
    cfg = tiny_config(**CONFIGS["top1-4e-norope"])
    write_checkpoint(tmp_path, cfg)
    ids = torch.randint(3, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.float32)
    hosted = moefit.load_model(str(tmp_path), quantization="nf4", dtype=torch.float32,
                               quant=QuantConfig(embeddings_on_host=True))
    emb = hosted.hf.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and emb.weight.device.type == "cpu"
    assert torch.equal(emb.weight, plain.hf.get_input_embeddings().weight)  # the loader filled the host table
    assert not any(p is emb.weight for p in hosted.parameters())
    with torch.no_grad():
        assert rel(hosted(ids, return_logits=True).logits, plain(ids, return_logits=True).logits) < 1e-6
    moefit.add_lora(hosted, r=4, alpha=8, dropout=0.0)
    hosted.train()
    hosted(ids, labels=ids).loss.backward()  # trains: gradients reach LoRA through the hosted lookup
    assert all(p.grad is not None for p in hosted.parameters() if p.requires_grad)


def test_tied_embeddings_cannot_move_to_host(tmp_path):
    write_checkpoint(tmp_path, tiny_config(**CONFIGS["top1-4e-norope"], tie_word_embeddings=True))
    with pytest.raises(MoefitError, match="embeddings_on_host"):
        moefit.load_model(str(tmp_path), quant=QuantConfig(embeddings_on_host=True))


def test_plan_drops_the_hosted_table_from_gpu_memory():
    from moefit.plan import plan

    def peak(on_host: bool) -> int:
        cfg = RunConfig(model="llama4-scout", lora=LoraConfig(), train=TrainConfig(max_length=2048),
                        quantization=QuantConfig(embeddings_on_host=on_host))
        return plan(cfg, gpus=["h200"], search=False).memory.peak_allocated

    table = 202048 * 5120 * 2
    assert abs((peak(False) - peak(True)) - table) < 2 * 2**20


def test_synthetic_bench_model_fills_the_hosted_table(tmp_path):
    from moefit.bench import build_synthetic_model

    tiny_config(**CONFIGS["top1-4e-norope"]).save_pretrained(tmp_path)
    m = build_synthetic_model(str(tmp_path), quant=QuantConfig(embeddings_on_host=True), device="cpu",
                              dtype=torch.float32)
    table = m.hf.get_input_embeddings().weight
    assert table.device.type == "cpu" and table.abs().sum() > 0
