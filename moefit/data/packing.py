"""Pack several samples into one sequence of at most max_length tokens.

Position ids restart at 0 at every sample; transformers (>= 5) turns restarting position ids, with no
attention_mask and no cache, into a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`),
so no token attends across a sample boundary. The first label of every sample is -100 (set when rendering),
so no loss crosses a boundary either.
"""

from __future__ import annotations

import bisect
from typing import Any

Sequence = dict[str, list[int]]


def packed_chunks_follow_positions() -> bool:
    """Whether this transformers lays a chunked-attention mask (Llama 4's `attention_chunk_size`) over each packed
    sample's own positions, as it does alone (5.24: `masking_utils.remap_positions_for_packed_sequence`). 5.17
    chunks the packed row by token index instead: a sample straddling a chunk boundary of the row sees other
    chunks than alone (no token attends across samples either way)."""
    from transformers import masking_utils

    return hasattr(masking_utils, "remap_positions_for_packed_sequence")


def chunked_packing_problem(config: dict[str, Any], max_length: int) -> str | None:
    """Why packed rows of `max_length` tokens would train the model of config.json `config` (a dict) on other
    attention chunks than each sample has alone under this transformers (said at the start of a run); None when
    they would not."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    chunk = text.get("attention_chunk_size")
    if not chunk or max_length <= chunk or packed_chunks_follow_positions():
        return None
    import transformers

    return (f"train.max_length {max_length} is longer than the model's attention_chunk_size {chunk}, and "
            f"transformers {transformers.__version__} chunks a packed row by token index, not by each sample's "
            "positions: a packed sample across a chunk boundary of its row sees other chunks than alone (never "
            f"another sample). For exact chunks set data.packing: false, or train.max_length <= {chunk}, or use "
            "a transformers that chunks packed samples by their positions (5.24 does).")


def single(input_ids: list[int], labels: list[int]) -> Sequence:
    return {"input_ids": list(input_ids), "labels": list(labels), "position_ids": list(range(len(input_ids)))}


def pack(samples: list[tuple[list[int], list[int]]], max_length: int) -> list[Sequence]:
    """Best-fit packing in input order: each sample goes to the open sequence it fills most tightly.

    Samples keep their relative order inside a sequence; sequences are returned in the order they were
    opened, so the result is a deterministic function of the input order.
    """
    bins: list[list[int]] = []  # indices of samples per sequence
    free: dict[int, list[int]] = {}  # remaining capacity -> bins with it (oldest first)
    caps: list[int] = []  # sorted capacities that have at least one bin
    for i, (ids, _) in enumerate(samples):
        n = len(ids)
        if n > max_length:
            raise ValueError(f"sample of {n} tokens is longer than max_length {max_length}; truncate first")
        j = bisect.bisect_left(caps, n)
        if j < len(caps):
            cap = caps[j]
            b = free[cap].pop(0)
            if not free[cap]:
                del free[cap]
                caps.pop(j)
        else:
            b, cap = len(bins), max_length
            bins.append([])
        bins[b].append(i)
        rest = cap - n
        if rest > 0:
            if rest not in free:
                free[rest] = []
                bisect.insort(caps, rest)
            bisect.insort(free[rest], b)
    out = []
    for members in bins:
        seq: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": []}
        for i in members:
            ids, labels = samples[i]
            seq["input_ids"] += ids
            seq["labels"] += labels
            seq["position_ids"] += range(len(ids))
        out.append(seq)
    return out
