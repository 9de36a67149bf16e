"""Held-out loss and perplexity of the base model and the fine-tuned one, side by side.

    result = evaluate_run("runs/tiny-…")                     # the run's own held-out split
    result = evaluate_run("runs/scout1", data="held_out.jsonl")

The data goes through the run's own pipeline (chat template, loss mask, max_length, packing), so the numbers are
comparable with the eval losses the trainer logged. Loss is token-weighted over every label token.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from .devices import pick_device
from .errors import DataError


@torch.no_grad()
def heldout_sums(model: Any, sequences: list[dict], batch_size: int, pad_id: int, device: torch.device,
                 max_batches: int | None = None, rank: int = 0, world_size: int = 1,
                 equal_passes: bool = False) -> tuple[float, int]:
    """(summed loss, label tokens) over `sequences` in batches of `batch_size`; with several ranks, rank r takes
    batches r, r + world_size, ... (sum the ranks' results for the whole set). `equal_passes`: every rank runs
    the same number of forward passes (expert parallelism: each pass is a collective), a rank short of a batch
    runs the first one again and does not count it."""
    from .data import collate
    from .models.causal_lm import placed_batch

    loss_sum, tokens = 0.0, 0
    starts = range(0, len(sequences), batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    mine = list(starts[rank::world_size])
    passes = -(-len(starts) // world_size) if equal_passes else len(mine)
    for n in range(passes):
        i = mine[n] if n < len(mine) else starts[0]
        batch = placed_batch(collate(sequences[i:i + batch_size], pad_id=pad_id), model, device)
        out = model(**batch)
        if n < len(mine):
            loss_sum += float(out.loss_sum)
            tokens += int(out.num_tokens)
    return loss_sum, tokens


def heldout_loss(model: Any, sequences: list[dict], batch_size: int, pad_id: int, device: torch.device,
                 max_batches: int | None = None) -> tuple[float, int]:
    """(token-weighted mean loss, label tokens) over `sequences`, in order."""
    loss_sum, tokens = heldout_sums(model, sequences, batch_size, pad_id, device, max_batches)
    return (loss_sum / tokens if tokens else float("nan")), tokens


def _entry(loss: float, tokens: int) -> dict[str, float | int]:
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens}


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, batch_size: int | None = None,
                 max_batches: int | None = None, device: str = "auto") -> dict[str, Any]:
    """{"base": {loss, perplexity, tokens}, "finetuned": {...}, "delta_loss", "sequences", "data"}."""
    from .config import RunConfig
    from .data import build_datasets, load_tokenizer
    from .lora import load_adapter
    from .models import load_model
    from .rundir import read_run

    info = read_run(run_dir)
    cfg = info.config or RunConfig(model=info.source)
    dev = pick_device(device)
    tok = load_tokenizer(str(info.base_dir))
    max_length, seed = cfg.train.max_length, cfg.train.seed
    if data is not None:
        if not Path(data).exists():
            raise DataError(f"{data}: file not found; pass a JSONL/JSON file (or folder) of held-out samples.")
        data_cfg = dataclasses.replace(cfg.data, train=str(data), eval=None, eval_fraction=0.0, shuffle=False)
        bundle = build_datasets(data_cfg, tok, max_length=max_length, seed=seed)
        sequences, described = bundle.train, str(data)
    else:
        bundle = build_datasets(cfg.data, tok, max_length=max_length, seed=seed)
        sequences = bundle.eval
        described = ("the run's held-out file " + str(cfg.data.eval) if cfg.data.eval else
                     "the shipped held-out chat set" if cfg.data.train is None else
                     f"the run's held-out split ({cfg.data.eval_fraction:.0%} of {cfg.data.train}, seed {seed})")
    if not sequences:
        raise DataError(f"no held-out sequences to evaluate on ({described}); pass a file with --data.")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    bs = batch_size or cfg.train.batch_size
    model = load_model(info.source, quantization=info.quant.weights, dtype=info.compute_dtype, device=dev,
                       quant=info.quant)
    model.eval()
    base = heldout_loss(model, sequences, bs, pad_id, dev, max_batches)
    load_adapter(model, info.adapter_dir)
    model.eval()
    tuned = heldout_loss(model, sequences, bs, pad_id, dev, max_batches)
    used = len(range(0, len(sequences), bs)[:max_batches]) if max_batches is not None else None
    return {"base": _entry(*base), "finetuned": _entry(*tuned), "delta_loss": tuned[0] - base[0],
            "sequences": len(sequences) if used is None else min(len(sequences), used * bs),
            "data": described, "model": info.source, "run": str(info.adapter_dir), "notes": info.notes}


def format_result(result: dict[str, Any]) -> list[str]:
    b, f = result["base"], result["finetuned"]
    return [
        f"held-out data: {result['data']} ({result['sequences']} sequences, {b['tokens']:,} label tokens)",
        f"{'':<12}{'loss':>10}{'perplexity':>14}",
        f"{'base':<12}{b['loss']:>10.4f}{b['perplexity']:>14.3f}",
        f"{'fine-tuned':<12}{f['loss']:>10.4f}{f['perplexity']:>14.3f}",
        f"change: {result['delta_loss']:+.4f} loss ({(f['perplexity'] / b['perplexity'] - 1):+.1%} perplexity)",
    ] + [f"note: {n}" for n in result.get("notes", [])]
