"""Chat with a trained run (base + adapter) or a model directory (e.g. a merged export), through its chat template.

    chat = load_chat_model("runs/tiny-…")
    reply = generate_reply(chat, [{"role": "user", "content": "When are you open?"}], stream=sys.stdout)

Tokens are streamed as they come; generation stops at the tokenizer's end-of-sequence or end-of-turn token.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from .devices import pick_device
from .errors import MoefitError

# End-of-turn tokens of the chat templates we know; whichever the tokenizer has stops generation.
END_OF_TURN = ("<|eot|>", "<|eot_id|>", "<|eom|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
               "<|return|>", "</s>")


@dataclass
class ChatModel:
    model: Any  # MoefitCausalLM
    tokenizer: Any
    stop_ids: list[int]
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.model.device


def stop_token_ids(tok: Any, model_dir: Path | None = None) -> list[int]:
    ids: list[int] = []
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    vocab = tok.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    if model_dir is not None and (model_dir / "generation_config.json").is_file():
        import json

        eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    return sorted(set(ids))


def load_chat_model(path: str | Path, device: str = "auto", dtype: str | torch.dtype | None = None,
                    quantization: str | None = None) -> ChatModel:
    """A run / adapter directory (its base model + the adapter, stored as during training) or a model directory
    (a merged export, 'tiny', a hub id). dtype defaults to float32 on CPU and bfloat16 on CUDA."""
    from .data import load_tokenizer
    from .lora import load_adapter
    from .models import load_model
    from .rundir import is_run_or_adapter_dir, read_run

    dev = pick_device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    p = Path(str(path)).expanduser()
    notes: list[str] = []
    if p.is_dir() and is_run_or_adapter_dir(p):
        info = read_run(p)
        model = load_model(info.source, quantization=quantization or info.quant.weights, dtype=dtype,
                           device=dev, quant=info.quant)
        load_adapter(model, info.adapter_dir)
        tok_dir = model.source_dir
        notes += info.notes
        source = f"{info.source} + adapter {p}"
    else:
        model = load_model(str(path), quantization=quantization or "nf4", dtype=dtype, device=dev)
        tok_dir = model.source_dir
        source = str(path)
    model.eval()
    tok = load_tokenizer(str(tok_dir))
    if not getattr(tok, "chat_template", None):
        raise MoefitError(f"{tok_dir}: the tokenizer has no chat template (chat_template.jinja or "
                          "tokenizer_config.json's chat_template); moefit generate needs one.")
    return ChatModel(model=model, tokenizer=tok, stop_ids=stop_token_ids(tok, Path(tok_dir)), source=source,
                     notes=notes)


class _Streamer:
    """Decodes the new tokens as they arrive and writes the text that is final so far to `out`."""

    def __init__(self, tok: Any, out: TextIO | None, stop_ids: list[int]):
        self.tok, self.out, self.stop = tok, out, set(stop_ids)
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        self.ids += [int(t) for t in value.reshape(-1) if int(t) not in self.stop]
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self._write(text[self.printed:])
        self.printed = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self._write(text[self.printed:])
        self.printed = len(text)

    def _write(self, s: str) -> None:
        if self.out is not None and s:
            self.out.write(s)
            self.out.flush()


@torch.no_grad()
def generate_reply(chat: ChatModel, messages: list[dict[str, str]], max_new_tokens: int = 256,
                   temperature: float = 0.7, top_p: float = 0.9, stream: TextIO | None = None,
                   seed: int | None = None) -> str:
    """The assistant's reply to `messages` (rendered with add_generation_prompt). temperature 0 = greedy."""
    tok = chat.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(chat.device)
    limit = getattr(chat.model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] + max_new_tokens > limit:
        raise MoefitError(f"the conversation is {ids.shape[1]} tokens; with max_new_tokens {max_new_tokens} it "
                          f"passes the model's {limit} positions. Start a new conversation (/reset) or lower "
                          "--max-new-tokens.")
    if seed is not None:
        torch.manual_seed(seed)
    streamer = _Streamer(tok, stream, chat.stop_ids)
    sample = temperature > 0
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=chat.stop_ids,
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else chat.stop_ids[0],
                                  streamer=streamer, attention_mask=torch.ones_like(ids), use_cache=True)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = chat.model.generate(ids, **kwargs)
    new = [int(t) for t in out[0, ids.shape[1]:] if int(t) not in chat.stop_ids]
    return tok.decode(new, skip_special_tokens=True)


def chat_repl(chat: ChatModel, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, system: str | None = None,
              **gen: Any) -> int:
    """Interactive chat: one user message per line; /reset starts over, /exit (or end of input) quits.
    Returns the number of replies."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turns = 0
    stdout.write("moefit chat: type a message and press Enter; /reset starts over, /exit quits.\n")
    while True:
        stdout.write("\nuser> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return turns
        msg = line.strip()
        if not msg:
            continue
        if msg in ("/exit", "/quit"):
            return turns
        if msg == "/reset":
            history = history[:1] if system else []
            stdout.write("(conversation cleared)\n")
            continue
        history.append({"role": "user", "content": msg})
        stdout.write("assistant> ")
        reply = generate_reply(chat, history, stream=stdout, **gen)
        stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
        turns += 1
