"""Rendering through the chat template and the loss mask, token by token."""

from __future__ import annotations

import pytest

from moefit.data.formats import Sample
from moefit.data.render import RenderError, render_messages, render_sample
from moefit.labels import IGNORE_INDEX as IGNORE
from tests.test_data_support import make_tokenizer

TOK = make_tokenizer()
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi! How are you?"}, {"role": "user", "content": "Fine, you?"},
        {"role": "assistant", "content": "Good."}]


def _expected(segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and labels written out by hand: each literal segment tokenized on its own, trained or not."""
    ids, labels = [], []
    for text, trained in segments:
        seg = TOK(text, add_special_tokens=False)["input_ids"]
        ids += seg
        labels += seg if trained else [IGNORE] * len(seg)
    labels[0] = IGNORE
    return ids, labels


def test_multi_turn_mask_token_by_token():
    r = render_messages(TOK, MSGS, "assistant")
    ids, labels = _expected([
        ("<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
         "<|header_start|>user<|header_end|>\n\nHello there<|eot|><|header_start|>assistant<|header_end|>\n\n", False),
        ("Hi! How are you?<|eot|>", True),
        ("<|header_start|>user<|header_end|>\n\nFine, you?<|eot|><|header_start|>assistant<|header_end|>\n\n", False),
        ("Good.<|eot|>", True),
    ])
    assert r.input_ids == ids
    assert r.labels == labels
    assert not r.boundary_merge
    # read back: exactly the assistant contents and their end-of-turn tokens carry loss
    eot = TOK.convert_tokens_to_ids("<|eot|>")
    trained = [t for t, lab in zip(r.input_ids, r.labels, strict=True) if lab != IGNORE]
    assert TOK.decode(trained, skip_special_tokens=False) == "Hi! How are you?<|eot|>Good.<|eot|>"
    eot_positions = [i for i, t in enumerate(r.input_ids) if t == eot]
    assert [r.labels[i] != IGNORE for i in eot_positions] == [False, False, True, False, True]
    header_ids = {TOK.convert_tokens_to_ids(t) for t in ("<|header_start|>", "<|header_end|>")}
    assert all(lab == IGNORE for t, lab in zip(r.input_ids, r.labels, strict=True) if t in header_ids)


def test_last_turn_and_all():
    last = render_messages(TOK, MSGS, "last_turn")
    trained = [t for t, lab in zip(last.input_ids, last.labels, strict=True) if lab != IGNORE]
    assert TOK.decode(trained, skip_special_tokens=False) == "Good.<|eot|>"
    everything = render_messages(TOK, MSGS, "all")
    assert everything.labels == [IGNORE] + everything.input_ids[1:]


def test_text_and_single_turn_formats():
    r = render_sample(TOK, Sample("f", 1, "text", text="hello world"))
    body = TOK("hello world", add_special_tokens=False)["input_ids"]
    assert r.input_ids == [TOK.bos_token_id] + body + [TOK.eos_token_id]
    assert r.labels == [IGNORE] + body + [TOK.eos_token_id]
    pc = [{"role": "user", "content": "2 + 2 ="}, {"role": "assistant", "content": "4"}]
    r = render_messages(TOK, pc)
    trained = [t for t, lab in zip(r.input_ids, r.labels, strict=True) if lab != IGNORE]
    assert TOK.decode(trained, skip_special_tokens=False) == "4<|eot|>"
    sp = render_sample(TOK, Sample("f", 1, "chat", messages=pc), system_prompt="Be nice.")
    assert "<|header_start|>system<|header_end|>\n\nBe nice.<|eot|>" in TOK.decode(sp.input_ids)


def test_no_template_single_exchange_and_refusal():
    plain = make_tokenizer(template=None)
    r = render_messages(plain, [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}])
    trained = [t for t, lab in zip(r.input_ids, r.labels, strict=True) if lab != IGNORE]
    assert trained == plain("A.", add_special_tokens=False)["input_ids"] + [plain.eos_token_id]
    assert r.input_ids[0] == plain.bos_token_id
    with pytest.raises(RenderError, match="no chat template"):
        render_messages(plain, MSGS)


CHATML = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Rewrites earlier assistant turns (like templates that strip reasoning from history): not prefix-consistent.
REWRITING = ("{%- for m in messages %}{%- if m['role'] == 'assistant' and not loop.last %}"
             "{{- '<|header_start|>assistant<|header_end|>\\n\\n' + m['content'] + '<|eot|>' }}"
             "{%- elif m['role'] == 'assistant' %}"
             "{{- '<|header_start|>assistant<|header_end|>\\n\\n<think></think>' + m['content'] + '<|eot|>' }}"
             "{%- else %}{{- '<|header_start|>' + m['role'] + '<|header_end|>\\n\\n' + m['content'] + '<|eot|>' }}"
             "{%- endif %}{%- endfor %}"
             "{%- if add_generation_prompt %}{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}{%- endif %}")


@pytest.mark.parametrize("template,expect", [
    (CHATML, "Hi! How are you?<|im_end|>\nGood.<|im_end|>\n"),
    # the first turn is found in the rewritten history; the final turn keeps its own rendering
    (REWRITING, "Hi! How are you?<|eot|><think></think>Good.<|eot|>"),
])
def test_other_templates(template, expect):
    tok = make_tokenizer(template)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    r = render_messages(tok, MSGS)
    trained = [t for t, lab in zip(r.input_ids, r.labels, strict=True) if lab != IGNORE]
    assert tok.decode(trained, skip_special_tokens=False) == expect
    assert r.input_ids == tok(tok.apply_chat_template(MSGS, tokenize=False), add_special_tokens=False)["input_ids"]


def test_template_errors_become_render_errors():
    strict = make_tokenizer("{%- if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}"
                            "{%- endif %}{%- for m in messages %}{{ m['content'] }}{%- endfor %}")
    with pytest.raises(RenderError, match="must start with user"):
        render_messages(strict, MSGS)


def test_token_merged_across_the_mask_boundary_uses_offsets():
    # "assistant: " then "the quick": byte-level BPE makes " the" one token spanning the boundary
    tok = make_tokenizer("{%- for m in messages %}{{- m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the quick"}]
    r = render_messages(tok, msgs)
    assert r.boundary_merge
    assert r.input_ids == tok("user: hi\nassistant: the quick\n", add_special_tokens=False)["input_ids"]
    trained = [t for t, lab in zip(r.input_ids, r.labels, strict=True) if lab != IGNORE]
    assert tok.decode(trained) == " the quick\n"
