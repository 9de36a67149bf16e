"""The shipped tiny Llama 4 MoE model, its tokenizer and the chat data set (built by scripts/build_tiny.py)."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Llama4ForCausalLM

from moefit.assets import chat_eval_path, chat_train_path, tiny_model_dir

ROLES = {"system", "user", "assistant"}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tiny_model_dir(), local_files_only=True)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(), local_files_only=True)


def _read(path) -> list[list[dict]]:
    convs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        obj = json.loads(line)
        assert set(obj) == {"messages"}, f"{path.name}:{n}"
        msgs = obj["messages"]
        assert msgs and all(set(m) == {"role", "content"} and m["role"] in ROLES for m in msgs), f"{path.name}:{n}"
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in msgs), f"{path.name}:{n}"
        assert msgs[-1]["role"] == "assistant", f"{path.name}:{n}"
        convs.append(msgs)
    return convs


def test_checkpoint_is_a_small_bf16_llama4_moe(model):
    assert isinstance(model, Llama4ForCausalLM)
    cfg = model.config
    assert cfg.model_type == "llama4_text"
    assert cfg.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.bfloat16
    assert cfg.num_experts_per_tok == 1 and cfg.num_local_experts >= 2
    assert sorted(cfg.moe_layers) == list(range(cfg.num_hidden_layers))
    assert 0 in cfg.no_rope_layers and 1 in cfg.no_rope_layers  # at least one NoPE layer, not all
    assert cfg.use_qk_norm and cfg.attention_chunk_size is not None
    assert not cfg.tie_word_embeddings
    assert cfg.hidden_size % 64 == 0 and cfg.intermediate_size % 64 == 0
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    E, H, Im = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    for layer in model.model.layers:
        ff = layer.feed_forward
        assert ff.experts.gate_up_proj.shape == (E, H, 2 * Im)
        assert ff.experts.down_proj.shape == (E, Im, H)
        assert ff.shared_expert.gate_proj.weight.shape == (Im, H)
        assert ff.router.weight.shape == (E, H)
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 5_000_000


def test_directory_is_small_and_complete():
    d = tiny_model_dir()
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in d.iterdir()) <= 10 * 1024 * 1024


def test_special_ids_agree(tok, model):
    eot = tok.convert_tokens_to_ids("<|eot|>")
    assert tok.eos_token == "<|eot|>" and tok.bos_token == "<|begin_of_text|>" and tok.pad_token == "<|pad|>"
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.eos_token_id == eot and model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id in (eot, [eot])
    assert model.config.vocab_size == len(tok)
    for t in ["<|end_of_text|>", "<|header_start|>", "<|header_end|>"]:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1


def test_tokenizer_round_trips(tok):
    assert 2000 <= len(tok) <= 4096
    for text in ["A sourdough loaf is £4.50.", "Café  naïve 🙂\n\n  tabs\tand 12345 digits", "hello@crumbandkettle.example"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_llama4_layout(tok):
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHello<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nHi!<|eot|>")
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|eot|><|header_start|>assistant<|header_end|>\n\n")
    sys_msgs = [{"role": "system", "content": "Be brief."}] + msgs
    assert tok.apply_chat_template(sys_msgs, tokenize=False).startswith(
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|><|header_start|>user")
    assert not re.search(r"{%-?\s*generation", tok.chat_template)  # masks come from prefix rendering


def test_data_files_valid_and_disjoint(tok):
    train, held = _read(chat_train_path()), _read(chat_eval_path())
    assert len(train) + len(held) >= 300
    assert 0.08 <= len(held) / (len(train) + len(held)) <= 0.2
    keys_train = {json.dumps(c, sort_keys=True) for c in train}
    keys_held = {json.dumps(c, sort_keys=True) for c in held}
    assert len(keys_train) == len(train) and len(keys_held) == len(held)
    assert not keys_train & keys_held
    both = train + held
    assert any(sum(m["role"] == "user" for m in c) >= 2 for c in both)
    assert any(sum(m["role"] == "user" for m in c) == 1 for c in both)
    assert any(c[0]["role"] == "system" for c in both)
    assert chat_train_path().stat().st_size + chat_eval_path().stat().st_size < 1_500_000


def test_prefix_renderings_tokenize_to_prefixes(tok):
    """Assistant masks are computed by rendering prefixes; that must line up with the full tokenization."""
    for msgs in _read(chat_eval_path()):
        full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                prefix = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
                p = tok(prefix, add_special_tokens=False)["input_ids"]
                assert full[: len(p)] == p


def test_model_loss_on_eval_conversations_is_sane(tok, model):
    texts = [tok.apply_chat_template(c, tokenize=False) for c in _read(chat_eval_path())[:6]]
    model = copy.deepcopy(model).float()  # the module fixture stays bf16
    with torch.no_grad():
        for text in texts:
            x = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            loss = model(input_ids=x, labels=x).loss.item()
            assert math.isfinite(loss) and loss < math.log(len(tok))
