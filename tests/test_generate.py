"""`moefit generate`: chat template, streaming, stop tokens, the REPL on a fake stdin, run dir vs merged export."""

from __future__ import annotations

import io

import pytest
import torch

import moefit
from moefit.cli import main
from moefit.errors import MoefitError
from moefit.generate import chat_repl, generate_reply, load_chat_model


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def chat(run_dir):
    return load_chat_model(run_dir, device="cpu")


MSG = [{"role": "user", "content": "When are you open?"}]


def test_reply_streams_and_matches_merged_export(chat, run_dir, tmp_path):
    out = io.StringIO()
    reply = generate_reply(chat, MSG, max_new_tokens=12, temperature=0, stream=out)
    assert reply and out.getvalue() == reply  # what was streamed is the reply
    # the prompt went through the chat template with the generation prompt
    text = chat.tokenizer.apply_chat_template(MSG, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|header_start|>assistant<|header_end|>\n\n")
    merged = tmp_path / "merged"
    moefit.export(run_dir, merged, dtype="float32")
    chat2 = load_chat_model(merged, device="cpu", quantization="none")
    assert generate_reply(chat2, MSG, max_new_tokens=12, temperature=0) == reply


def test_stops_at_end_of_turn(chat):
    eot = chat.tokenizer.convert_tokens_to_ids("<|eot|>")
    assert eot in chat.stop_ids
    with torch.no_grad():  # make <|eot|> the only likely token: generation must stop after one step
        bias = torch.full((chat.model.config.vocab_size,), -1e4)
        bias[eot] = 1e4
        head = chat.model.hf.lm_head
        old = getattr(head, "bias", None)
        head.bias = torch.nn.Parameter(bias, requires_grad=False)
        calls = []
        hook = head.register_forward_hook(lambda *a: calls.append(1))
        try:
            assert generate_reply(chat, MSG, max_new_tokens=20, temperature=0) == ""
        finally:
            head.bias = old
            hook.remove()
    assert len(calls) == 1  # one step, then stop (not 20 end-of-turn tokens filtered out)


def test_repl_on_fake_stdin(chat):
    stdin = io.StringIO("hello\n\n/reset\nare you open on Monday?\n")
    stdout = io.StringIO()
    turns = chat_repl(chat, stdin, stdout, system="You are terse.", max_new_tokens=4, temperature=0.8, seed=0)
    text = stdout.getvalue()
    assert turns == 2
    assert text.count("assistant> ") == 2 and "(conversation cleared)" in text


def test_cli_prompt(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_cli_refuses_an_empty_prompt(prompt, capsys):
    assert main(["generate", "no-such-run", "--prompt", prompt]) == 2  # refused before anything is loaded
    err = capsys.readouterr().err
    assert "--prompt is empty" in err and "Traceback" not in err


def test_refuses_peft_adapter_dir(run_dir, tmp_path):
    moefit.export(run_dir, tmp_path / "peft", merge=False)
    with pytest.raises(MoefitError, match="PEFT adapter"):
        load_chat_model(tmp_path / "peft", device="cpu")
