"""Helpers for the data tests: a byte-level tokenizer with a Llama-4-style chat template, a tiny Llama 4 MoE.

Built here (not downloaded) so the tests need nothing but the installed libraries.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>",
            "<|finetune_right_pad_id|>"]

# The structure of Llama 4's template: bos, then per message a header, the content and <|eot|>.
LLAMA4_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for c in message['content'] %}{{- c['text'] }}{%- endfor %}{%- endif %}"
    "{{- '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is the capital.",
    "Translate to Italian: good morning. Buongiorno.", "user assistant system hello there, how are you?",
    "Write a haiku about the sea. Waves fold into foam.", "1 + 1 = 2, 2 + 2 = 4, numbers and words.",
]


def make_tokenizer(template: str | None = LLAMA4_TEMPLATE):
    """A small byte-level BPE tokenizer (any text encodes) with Llama 4's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                                  pad_token="<|finetune_right_pad_id|>")
    if template is not None:
        tok.chat_template = template
    return tok


def tiny_llama4(vocab_size: int, seed: int = 0, attn: str = "sdpa", chunk: int = 8192):
    """Random-init Llama4ForCausalLM: 2 layers (one RoPE chunked-attention layer, one NoPE full layer), 4 experts."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    cfg = Llama4TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           num_local_experts=4, num_experts_per_tok=1, no_rope_layer_interval=2,
                           attention_chunk_size=chunk, max_position_embeddings=1024, bos_token_id=None,
                           eos_token_id=None, pad_token_id=None, attn_implementation=attn)
    return Llama4ForCausalLM(cfg).float()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def train_step(model, batch: dict) -> float:
    """One forward with labels + backward + AdamW step; returns the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                use_cache=False)
    out.loss.backward()
    opt.step()
    return float(out.loss.detach())


def test_template_renders_llama4_layout():
    tok = make_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert text == ("<|begin_of_text|><|header_start|>user<|header_end|>\n\nhi<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\nyo<|eot|>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.convert_tokens_to_ids("<|eot|>")
