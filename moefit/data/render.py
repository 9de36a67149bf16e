"""Render a sample to token ids and labels through the tokenizer's own chat template.

The loss mask is computed without `{% generation %}` markers so that it works for any model's template:
the conversation is rendered prefix by prefix; for assistant message k the trained characters run from
the end of ``render(messages[:k], add_generation_prompt=True)`` (the assistant header) to the end of
``render(messages[:k+1])`` (its content and end-of-turn token). When a template does not render
prefixes consistently (some rewrite earlier turns), the content is located in the full rendering and
the template's end-of-turn text, found from a probe conversation, is appended.
Characters map to tokens by tokenizing the trained / untrained segments separately; when their
concatenation differs from the tokenization of the whole text (a token merged across a boundary), the
whole text's tokens are used and marked by their character offsets, and the sample is counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..labels import IGNORE_INDEX
from .formats import Sample

LOSS_ON = ("assistant", "all", "last_turn")
_PROBE = "\u2063moefit-probe\u2063"


class RenderError(ValueError):
    """A sample the tokenizer's template cannot render (the message becomes a BadLine reason)."""


class NoChatTemplate(RenderError):
    """A conversation that needs a chat template, and the tokenizer has none: a problem of the model folder, not
    of the record (the data pipeline reports it once, not per record)."""


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE_INDEX where the token carries no loss
    boundary_merge: bool = False  # the segment tokenization disagreed with the whole text's

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def has_chat_template(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


def _apply(tok: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        out = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja TemplateError, or a template's own raise_exception
        raise RenderError(f"the chat template cannot render this conversation ({e})") from None
    if not isinstance(out, str):  # pragma: no cover - older transformers returned lists for batches
        out = out[0]
    return out


def end_of_turn_text(tok: Any) -> str:
    """The text a template writes after an assistant message's content (e.g. '<|eot|>')."""
    cache = getattr(tok, "_moefit_eot_text", None)
    if cache is not None and cache[0] == tok.chat_template:
        return cache[1]
    full = _apply(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}], False)
    at = full.rfind(_PROBE)
    eot = full[at + len(_PROBE):] if at >= 0 else ""
    try:
        tok._moefit_eot_text = (tok.chat_template, eot)
    except AttributeError:  # pragma: no cover
        pass
    return eot


def _assistant_spans(tok: Any, messages: list[dict[str, str]], targets: list[int], full: str) -> list[tuple[int, int]]:
    spans = []
    cursor = 0
    for k in targets:
        span = None
        if k > 0:
            head = _apply(tok, messages[:k], True)
            upto = full if k == len(messages) - 1 else _apply(tok, messages[:k + 1], False)
            if upto.startswith(head) and full.startswith(upto) and len(head) >= cursor:
                span = (len(head), len(upto))
        if span is None:  # the template is not prefix-consistent here: locate the content itself
            content = messages[k]["content"].strip()
            at = full.find(content, cursor)
            if at < 0:
                raise RenderError(f"the chat template rewrites assistant message {k + 1}; its text is not in the "
                                  "rendered conversation, so its loss mask cannot be computed")
            end = at + len(content)
            eot = end_of_turn_text(tok)
            if eot and full.startswith(eot, end):
                end += len(eot)
            elif eot.strip() and full.startswith(eot.strip(), end):
                end += len(eot.strip())
            span = (at, end)
        spans.append(span)
        cursor = span[1]
    return spans


def _tokenize_spans(tok: Any, text: str, spans: list[tuple[int, int]]) -> Rendered:
    """Token ids of `text` with labels on the tokens inside `spans` (sorted, disjoint character ranges)."""
    segments: list[tuple[str, bool]] = []
    pos = 0
    for start, end in spans:
        if start > pos:
            segments.append((text[pos:start], False))
        if end > start:
            segments.append((text[start:end], True))
        pos = end
    if pos < len(text):
        segments.append((text[pos:], False))
    ids: list[int] = []
    labels: list[int] = []
    for seg, trained in segments:
        seg_ids = tok(seg, add_special_tokens=False)["input_ids"]
        ids += seg_ids
        labels += seg_ids if trained else [IGNORE_INDEX] * len(seg_ids)
    if not getattr(tok, "is_fast", False):
        return Rendered(ids, labels)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] == ids:
        return Rendered(ids, labels)
    whole = list(enc["input_ids"])
    whole_labels = []
    for tid, (s, e) in zip(whole, enc["offset_mapping"], strict=True):
        inside = any(s < b and e > a for a, b in spans) if e > s else any(a <= s < b for a, b in spans)
        whole_labels.append(tid if inside else IGNORE_INDEX)
    return Rendered(whole, whole_labels, boundary_merge=True)


def _plain_conversation(tok: Any, messages: list[dict[str, str]], loss_on: str) -> Rendered:
    """No chat template: a single exchange as prompt text then completion + eos (base models)."""
    if sum(m["role"] == "assistant" for m in messages) != 1 or messages[-1]["role"] != "assistant":
        raise NoChatTemplate("the tokenizer has no chat template, so only single prompt/answer records can be "
                             "rendered; use a model with a chat template or the text format")
    prompt = "\n\n".join(m["content"] for m in messages[:-1]) + "\n\n"
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    p_ids = bos + tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(messages[-1]["content"], add_special_tokens=False)["input_ids"] + eos
    ids = p_ids + c_ids
    labels = list(ids) if loss_on == "all" else [IGNORE_INDEX] * len(p_ids) + c_ids
    return Rendered(ids, labels)


def render_messages(tok: Any, messages: list[dict[str, str]], loss_on: str = "assistant") -> Rendered:
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if not has_chat_template(tok):
        out = _plain_conversation(tok, messages, loss_on)
    else:
        full = _apply(tok, messages, False)
        if loss_on == "all":
            spans = [(0, len(full))]
        else:
            targets = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if loss_on == "last_turn":
                targets = targets[-1:]
            spans = _assistant_spans(tok, messages, targets, full)
        out = _tokenize_spans(tok, full, spans)
    if out.labels:
        out.labels[0] = IGNORE_INDEX  # nothing predicts the first token (and no loss crosses a packed boundary)
    return out


def render_text(tok: Any, text: str) -> Rendered:
    """Plain text: bos + text + eos, every token trained."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids = bos + tok(text, add_special_tokens=False)["input_ids"] + eos
    labels = list(ids)
    if labels:
        labels[0] = IGNORE_INDEX
    return Rendered(ids, labels)


def render_sample(tok: Any, sample: Sample, loss_on: str = "assistant", system_prompt: str | None = None) -> Rendered:
    """Token ids and labels of one validated sample. Raises RenderError when the template refuses it."""
    if sample.messages is None:
        return render_text(tok, sample.text or "")
    messages = sample.messages
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return render_messages(tok, messages, loss_on)
