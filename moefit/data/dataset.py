"""From a DataConfig to train/eval sequences, and from sequences to batches that a checkpoint can resume.

Order is a pure function of the seed: samples are split and shuffled with `random.Random` seeded by
strings (stable across processes and Python versions), packed in that order, and every epoch visits the
sequences in a permutation seeded by (seed, epoch). A `DataPosition` (epoch, index of the next sequence)
is all a checkpoint stores to resume with exactly the batches not yet seen.

Feed batches to the model as ``model(input_ids=..., position_ids=..., labels=..., use_cache=False)`` with no
attention_mask: transformers only derives the packed (block-diagonal) mask from position_ids when there is
neither an attention mask nor a cache.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..labels import IGNORE_INDEX
from .formats import BadLine, FileResult, Sample, enforce_policy, read_data
from .packing import Sequence, pack, single
from .render import NoChatTemplate, RenderError, render_sample
from .report import DataReport, SplitStats, no_sample_reason


@dataclass
class Encoded:
    """A rendered sample after truncation, with what truncation cost it."""

    sample: Sample
    input_ids: list[int]
    labels: list[int]
    full_length: int  # tokens before truncation
    full_loss_tokens: int
    boundary_merge: bool = False

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode_samples(samples: list[Sample], tok: Any, max_length: int, loss_on: str = "assistant",
                   system_prompt: str | None = None) -> tuple[list[Encoded], list[BadLine]]:
    """Render and truncate every sample; samples the template refuses come back as BadLines. Conversations that
    need a chat template the tokenizer lacks stop here with one DataError (the model folder is what to fix)."""
    out, bad, untemplated = [], [], []
    for s in samples:
        try:
            r = render_sample(tok, s, loss_on, system_prompt)
        except NoChatTemplate:
            untemplated.append(s)
            continue
        except RenderError as e:
            bad.append(BadLine(s.source, s.line, str(e)))
            continue
        out.append(Encoded(s, r.input_ids[:max_length], r.labels[:max_length], len(r.input_ids), r.loss_tokens,
                           r.boundary_merge))
    if untemplated:
        first = untemplated[0]
        raise DataError(f"{getattr(tok, 'name_or_path', '') or 'the tokenizer'}: the tokenizer has no chat template "
                        f"(no chat_template.jinja, no chat_template in tokenizer_config.json), so "
                        f"{len(untemplated)} multi-turn conversation records cannot be rendered (first: "
                        f"{first.source} line {first.line}). Copy the model's chat template file into its folder, "
                        "or use a model that has one, or text-format data.")
    return out, bad


@dataclass
class DataBundle:
    train: list[Sequence]
    eval: list[Sequence]
    report: DataReport
    train_samples: list[Encoded] = field(default_factory=list, repr=False)
    eval_samples: list[Encoded] = field(default_factory=list, repr=False)


def _read(path: str | Path, fmt: str, role: str, report: DataReport) -> tuple[list[Sample], list[BadLine]]:
    files: list[FileResult] = read_data(path, fmt)
    samples, bad = [], []
    for f in files:
        report.files.append({**f.to_dict(), "role": role})
        samples += f.samples
        bad += f.errors
    return samples, bad


def _sequences(encoded: list[Encoded], max_length: int, packing: bool) -> list[Sequence]:
    if packing:
        return pack([(e.input_ids, e.labels) for e in encoded], max_length)
    return [single(e.input_ids, e.labels) for e in encoded]


def _stats(encoded: list[Encoded], sequences: list[Sequence]) -> SplitStats:
    return SplitStats(samples=len(encoded), sequences=len(sequences), tokens=sum(len(e.input_ids) for e in encoded),
                      loss_tokens=sum(e.loss_tokens for e in encoded))


def data_paths(data_cfg: Any) -> tuple[str | Path, str | Path | None]:
    """(train, eval) files or folders of a DataConfig; `train: null` is the embedded chat data set and its
    held-out file."""
    train_path, eval_path = data_cfg.train, data_cfg.eval
    if train_path is None:
        from ..assets import chat_eval_path, chat_train_path

        train_path = chat_train_path()
        if eval_path is None and chat_eval_path().is_file():
            eval_path = chat_eval_path()
        if not Path(train_path).is_file():
            raise DataError(f"{train_path}: the embedded chat data set is missing from this install; "
                            "set data.train to your own data file.")
    return train_path, eval_path


def build_datasets(data_cfg: Any, tok: Any, max_length: int, seed: int) -> DataBundle:
    """Read, validate, render, truncate, split and pack the data a DataConfig names.

    `data_cfg.train is None` selects the embedded chat data set (and its held-out file as eval).
    Bad records stop the build with a DataError listing them, unless `data_cfg.skip_invalid`.
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 tokens, got {max_length}.")
    train_path, eval_path = data_paths(data_cfg)
    report = DataReport(max_length=max_length, packing=data_cfg.packing)
    train_s, bad = _read(train_path, data_cfg.format, "train", report)
    eval_s: list[Sample] = []
    if eval_path is not None:
        eval_s, eval_bad = _read(eval_path, data_cfg.format, "eval", report)
        bad += eval_bad
    train_e, render_bad = encode_samples(train_s, tok, max_length, data_cfg.loss_on, data_cfg.system_prompt)
    eval_e, eval_render_bad = encode_samples(eval_s, tok, max_length, data_cfg.loss_on, data_cfg.system_prompt)
    render_bad += eval_render_bad
    for f in report.files:  # records the chat template refused are bad records of their file too
        f["bad"] += sum(b.source == f["path"] for b in render_bad)
        f["samples"] -= sum(b.source == f["path"] for b in render_bad)
    report.samples_read = len(train_e) + len(eval_e)
    report.skipped = sorted(bad + render_bad, key=lambda b: (b.source, b.line))
    enforce_policy(report.skipped, data_cfg.skip_invalid)

    kept_train, kept_eval = [], []
    for group, kept in ((train_e, kept_train), (eval_e, kept_eval)):
        for e in group:
            if e.full_length > max_length:
                report.truncated += 1
                report.truncated_tokens += e.full_length - max_length
            report.boundary_merges += e.boundary_merge
            if e.loss_tokens == 0:
                why = ("all trained tokens are past max_length" if e.full_loss_tokens
                       else "no token carries loss")
                report.dropped_all_truncated.append(BadLine(e.sample.source, e.sample.line,
                                                            f"{why} ({e.full_length} tokens, max_length {max_length})"))
                continue
            kept.append(e)

    if eval_path is None and data_cfg.eval_fraction > 0 and len(kept_train) >= 2:
        order = list(range(len(kept_train)))
        random.Random(f"moefit-split:{seed}").shuffle(order)
        n_eval = min(len(order) - 1, max(1, round(len(order) * data_cfg.eval_fraction)))
        eval_idx = set(order[:n_eval])
        kept_eval = [e for i, e in enumerate(kept_train) if i in eval_idx]
        kept_train = [e for i, e in enumerate(kept_train) if i not in eval_idx]
    if not kept_train:
        train_files = [f for f in report.files if f["role"] == "train"]
        why = no_sample_reason(train_files, len(report.dropped_all_truncated), max_length)
        raise DataError(f"{train_path}: no usable training sample: {why}.")
    if data_cfg.shuffle:
        random.Random(f"moefit-order:{seed}").shuffle(kept_train)
    train_seq = _sequences(kept_train, max_length, data_cfg.packing)
    eval_seq = _sequences(kept_eval, max_length, data_cfg.packing)
    report.train = _stats(kept_train, train_seq)
    report.eval = _stats(kept_eval, eval_seq)
    return DataBundle(train_seq, eval_seq, report, kept_train, kept_eval)


# --------------------------------------------------------------------------------------------- batches

@dataclass(frozen=True)
class DataPosition:
    """Where a run is in the data: the epoch, and how many sequences of its permutation were consumed."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        try:
            pos = cls(epoch=int(d["epoch"]), index=int(d["index"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"invalid data position {d!r} in the checkpoint ({e}).") from None
        if pos.epoch < 0 or pos.index < 0:
            raise DataError(f"invalid data position {d!r} in the checkpoint (negative).")
        return pos


def fingerprint(sequences: list[Sequence]) -> str:
    """A short hash of the sequences (ids, labels, positions, order): a checkpoint stores it beside its
    DataPosition so that resuming on data that changed is detected instead of silently skipping other samples."""
    h = hashlib.sha256()
    for seq in sequences:
        for key in ("input_ids", "labels", "position_ids"):
            h.update(array("q", seq[key]).tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


def any_packed(sequences: list[Sequence], length: int) -> bool:
    """Whether some sequence, padded to `length`, holds more than one sample (the padding is one of its own)."""
    return any(len(s["input_ids"]) < length or 0 in s["position_ids"][1:] for s in sequences)


def padding_fraction(sequences: list[Sequence], length: int) -> float:
    """The share of padding when every sequence is padded to `length` tokens."""
    real = sum(len(s["input_ids"]) for s in sequences)
    return 1 - real / max(len(sequences) * length, 1)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(f"moefit-epoch:{seed}:{epoch}").shuffle(order)
    return order


class Batch(dict):
    """A collated batch: the model's keyword arguments, and how many of its tokens are the data's (`real_tokens`;
    the rest is padding), which the trainer's tokens/s counts."""

    real_tokens: int = 0


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The data's tokens in a batch: a collated Batch's real ones, else every input id."""
    return batch.real_tokens if isinstance(batch, Batch) else int(batch["input_ids"].numel())


def collate(rows: list[Sequence], pad_id: int, pad_to: int | None = None, rows_to: int | None = None) -> Batch:
    """Right-pad rows to the longest (at least `pad_to`): pad_id with label -100; padding gets its own restarting
    positions. `rows_to`: rows of padding only are added up to that many rows (no labels: they change neither the
    loss nor a gradient)."""
    length = max(max(len(r["input_ids"]) for r in rows), pad_to or 0)
    ids, labels, pos = [], [], []
    empty: Sequence = {"input_ids": [], "labels": [], "position_ids": []}
    for r in [*rows, *[empty] * max(0, (rows_to or 0) - len(rows))]:
        n = length - len(r["input_ids"])
        ids.append(r["input_ids"] + [pad_id] * n)
        labels.append(r["labels"] + [IGNORE_INDEX] * n)
        pos.append(r["position_ids"] + list(range(n)))
    batch = Batch(input_ids=torch.tensor(ids, dtype=torch.long), labels=torch.tensor(labels, dtype=torch.long),
                  position_ids=torch.tensor(pos, dtype=torch.long))
    batch.real_tokens = sum(len(r["input_ids"]) for r in rows)
    return batch


def iterate_batches(sequences: list[Sequence], batch_size: int, seed: int, start: DataPosition | None = None,
                    pad_id: int | None = None, shuffle: bool = True, pad_to: int | None = None
                    ) -> Iterator[tuple[dict[str, torch.Tensor], DataPosition]]:
    """Endless batches over epochs, each with the position to resume from after it.

    The last batch of an epoch may hold fewer sequences than batch_size (no sequence is dropped or repeated).
    `pad_to`: every batch at least that many tokens long and batch_size rows (an epoch's last batch gets rows of
    padding only): one shape for CUDA graphs (engine.layer_graphs), whose graphs for a second shape would hold their
    own outputs and pool.
    """
    n = len(sequences)
    if n == 0:
        raise DataError("no sequences to iterate over (the data set is empty).")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}.")
    start = start or DataPosition()
    if start.index > n:
        raise DataError(f"data position {start.to_dict()} is past the end of an epoch of {n} sequences; "
                        "the data changed since the checkpoint was written.")
    pad = 0 if pad_id is None else pad_id
    epoch, index = start.epoch, start.index
    while True:
        order = epoch_order(n, seed, epoch, shuffle)
        while index < n:
            rows = [sequences[i] for i in order[index:index + batch_size]]
            index += len(rows)
            after = DataPosition(epoch, index) if index < n else DataPosition(epoch + 1, 0)
            yield collate(rows, pad, pad_to, batch_size if pad_to else None), after
        epoch, index = epoch + 1, 0
