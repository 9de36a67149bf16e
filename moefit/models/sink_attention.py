"""Attention with sinks (gpt-oss) through torch's fused SDPA kernels instead of transformers' eager path.

gpt-oss adds one learned logit per head (the sink) to every softmax row: p_j = exp(s_j) / (sum_i exp(s_i) +
exp(sink)), and the sink carries no value. transformers runs it eagerly, materialising [heads, T, T] scores, their
softmax and copies (about 2 GiB per layer at 2,048 tokens, kept for the backward) at eager speed.

The same thing as one ordinary attention over one more key: append a constant 1 to every query and a 0 to every
key, and put in front of the keys a "sink key" that is 0 everywhere but sink / scale in that extra column, with a
zero value. Its score is exactly the sink for every query; the fused kernels (flash / memory-efficient) then do the
rest, backward included. The causal mask is aligned to the bottom right (query i sees the sink and keys 0..i);
sliding-window layers get an explicit boolean mask. The head dimension is padded with zeros to a multiple of 8.
Exact: no approximation beyond the kernels' own rounding (the sink logit is scaled by a power of two for the
usual 1/sqrt(64)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..devices import in_graph_capture
from . import host_positions

NAME = "moefit_fused_sinks"  # no "sdpa" in it: transformers would check the class for its own SDPA path


def sdpa_with_sinks(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    sliding_window: int | None = None, s_aux: torch.Tensor | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: query [B, Hq, T, D], key/value [B, Hkv, S, D], `s_aux` the
    sinks [Hq]; returns ([B, T, Hq, D], None)."""
    b, hq, t, d = query.shape
    s = key.shape[2]
    if key.shape[1] != hq:  # grouped-query attention: one key/value head serves hq / hkv query heads
        key = key.repeat_interleave(hq // key.shape[1], dim=1)
        value = value.repeat_interleave(hq // value.shape[1], dim=1)
    scale = scaling if scaling is not None else d ** -0.5
    if s_aux is None:
        raise ValueError(f"{NAME} needs the attention sinks (s_aux)")
    width = d + 1 + (-(d + 1)) % 8
    extra = width - d
    q = torch.cat([query, query.new_ones(b, hq, t, 1), query.new_zeros(b, hq, t, extra - 1)], dim=-1)
    sink_key = torch.zeros(b, hq, 1, width, dtype=key.dtype, device=key.device)
    sink_key[..., d] = (s_aux / scale).to(key.dtype)[None, :, None]
    k = torch.cat([sink_key, torch.cat([key, key.new_zeros(b, hq, s, extra)], dim=-1)], dim=2)
    v = torch.cat([value.new_zeros(b, hq, 1, width),
                   torch.cat([value, value.new_zeros(b, hq, s, extra)], dim=-1)], dim=2)
    attention_mask = _with_sample_boundaries(attention_mask, kwargs.get("position_ids"), t, s, sliding_window)
    mask = _mask_with_sink(attention_mask, t, s, sliding_window, query.device)
    dropout_p = dropout if module.training else 0.0
    if mask is None:  # no padding, no window: causal aligned to the bottom right (the sink column sees everyone)
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, s + 1), dropout_p=dropout_p,
                                             scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out[..., :d].transpose(1, 2).contiguous(), None


# One entry: the last position ids seen (the tensor itself, so its id cannot be reused meanwhile), whether their
# rows restart inside, and the masks made from them, one per window and attention mask: every layer of a forward
# and of its recomputation in backward shares them (gpt-oss alternates sliding and full layers).
_PACKED: dict[str, object] = {}


def _with_sample_boundaries(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, t: int, s: int,
                            window: int | None) -> torch.Tensor | None:
    """Packed rows (positions restarting at 0 inside a row): a boolean mask that keeps each sample to itself.

    transformers' gpt-oss builds its masks without the position ids, so packed samples would attend to each other
    (other families detect packing from them). Without packing, or with a KV cache (t != s), the mask is unchanged.
    Decided from the forward's host copy of the position ids when there is one (host_positions); else one host
    read per forward (kept with the position ids tensor), none per layer."""
    if position_ids is None or t != s or position_ids.shape[-1] != t:
        return attention_mask
    entry = _entry_for(position_ids)
    if not entry["restarts"]:
        return attention_mask
    # Captured into a CUDA graph (models.layer_graphs), the mask is made inside the graph on every replay: a kept
    # one would be read at its address after the next position ids had cleared it (an H200 call, 2026-12-02:
    # replayed gpt-oss layers then read another graph's temporaries as their mask).
    capturing = in_graph_capture(position_ids)
    for win, given, mask in [] if capturing else entry["masks"]:
        if win == window and given is attention_mask:
            return mask
    pos = position_ids.reshape(-1, t)
    sample = torch.cumsum((pos == 0).to(torch.int32), dim=-1)  # [B, T]: which sample of the row
    q_at = torch.arange(t, device=pos.device)
    allowed = (sample[:, :, None] == sample[:, None, :]) & (q_at[None, :] <= q_at[:, None])[None]
    if window is not None:
        allowed &= (q_at[None, :] > q_at[:, None] - window)[None]
    allowed = allowed[:, None]  # [B, 1, T, T]
    if attention_mask is None:
        mask = allowed
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask[..., :s] & allowed
    else:
        mask = attention_mask[..., :s].masked_fill(~allowed, torch.finfo(attention_mask.dtype).min)
    if not capturing:
        entry["masks"].append((window, attention_mask, mask))
    return mask


def _entry_for(position_ids: torch.Tensor) -> dict[str, object]:
    """`_PACKED` for these position ids, started afresh when they changed. Whether some row packs several samples
    is decided once per entry: from the forward's host copy when there is one (host_positions), so the
    recomputation in backward (checkpointing, outside the forward) reuses the answer; else read back from the
    device."""
    key = _PACKED.get("key")
    if key is None or key[0] is not position_ids or key[1] != position_ids._version:
        on_host = host_positions.current(position_ids)
        restarts = on_host.restarts_inside_a_row() if on_host is not None else _restarts_on_device(position_ids)
        _PACKED.clear()
        _PACKED.update(key=(position_ids, position_ids._version), restarts=restarts, masks=[])
    return _PACKED


def _restarts_on_device(position_ids: torch.Tensor) -> bool:
    """The fall-back: one host read of the device's position ids."""
    return bool((position_ids.reshape(-1, position_ids.shape[-1])[:, 1:] == 0).any())


def _mask_with_sink(attention_mask: torch.Tensor | None, t: int, s: int, window: int | None,
                    device: torch.device) -> torch.Tensor | None:
    """The mask over [sink, keys]: None for plain causal attention; else boolean (True = attend) or additive."""
    if attention_mask is None:
        if window is None:
            return None
        q_pos = torch.arange(s - t, s, device=device)[:, None]
        k_pos = torch.arange(s, device=device)[None, :]
        attention_mask = ((k_pos <= q_pos) & (k_pos > q_pos - window))[None, None]
    attention_mask = attention_mask[..., :s]
    if attention_mask.dtype == torch.bool:
        sink = attention_mask.new_ones(*attention_mask.shape[:-1], 1)
    else:
        sink = attention_mask.new_zeros(*attention_mask.shape[:-1], 1)
    return torch.cat([sink, attention_mask], dim=-1)


def register() -> str:
    """Make NAME a transformers attention implementation (idempotent); its masks are SDPA's."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(NAME, sdpa_with_sinks)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
