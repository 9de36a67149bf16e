"""build_datasets → packing → batches: every format trains a tiny Llama 4; packing keeps samples apart; resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moefit.config import DataConfig
from moefit.data import DataPosition, build_datasets, fingerprint, iterate_batches, load_tokenizer
from moefit.data.dataset import batch_tokens, collate
from moefit.data.packing import chunked_packing_problem, pack, packed_chunks_follow_positions
from moefit.errors import DataError, MoefitError
from moefit.labels import IGNORE_INDEX as IGNORE
from tests.test_data_formats import RECORDS
from tests.test_data_support import make_tokenizer, tiny_llama4, train_step, write_jsonl

TOK = make_tokenizer()


def _records(fmt: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        r = json.loads(json.dumps(RECORDS[fmt]))
        if fmt == "text":
            r["text"] += f" Number {i}."
        elif fmt == "instruction":
            r["output"] += f" {i}"
        elif fmt == "chat":
            r["messages"][-1]["content"] += f" {i}"
        elif fmt == "sharegpt":
            r["conversations"][-1]["value"] += f" {i}"
        else:
            r["completion"] += f" {i}"
        out.append(r)
    return out


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_trains_the_tiny_model(tmp_path, fmt):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", _records(fmt, 12))
    bundle = build_datasets(DataConfig(train=str(path), eval_fraction=0.25), TOK, max_length=256, seed=3)
    rep = bundle.report
    assert rep.files[0]["format"] == fmt and rep.samples_read == 12
    assert (rep.train.samples, rep.eval.samples) == (9, 3)
    assert rep.train.sequences < rep.train.samples  # short samples were packed
    for seq in bundle.train + bundle.eval:
        assert len(seq["input_ids"]) == len(seq["labels"]) == len(seq["position_ids"]) <= 256
    assert rep.loss_tokens == sum(lab != IGNORE for s in bundle.train + bundle.eval for lab in s["labels"])
    model = tiny_llama4(len(TOK))
    before = model.lm_head.weight.detach().clone()
    batch, _ = next(iterate_batches(bundle.train, 2, seed=3, pad_id=TOK.pad_token_id))
    loss = train_step(model, batch)
    assert math.isfinite(loss) and loss > 0
    assert not torch.equal(before, model.lm_head.weight)


def test_packed_logits_equal_alone():
    """Packed with others, a sample's logits are those it has alone (sdpa and eager; chunked and NoPE layers).
    Where transformers chunks the packed row by token index (5.17), only the samples that straddle no chunk
    boundary of the row are: the others differ, as `packed_chunks_follow_positions` says (a run warns)."""
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, len(TOK), (n,), generator=g).tolist() for n in (13, 1, 5, 21, 9)]
    rows = pack([(s, [IGNORE] + s[1:]) for s in samples], 64)
    assert len(rows) == 1 and rows[0]["position_ids"][13:16] == [0, 0, 1]
    batch = collate(rows, TOK.pad_token_id)
    chunk, per_sample = 8, packed_chunks_follow_positions()
    for attn in ("sdpa", "eager"):
        model = tiny_llama4(len(TOK), attn=attn, chunk=chunk).eval()  # chunk < sample length: chunking is exercised
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
            off = 0
            for s in samples:
                alone = model(input_ids=torch.tensor([s]), use_cache=False).logits[0]
                same = (alone - packed[off:off + len(s)]).abs().max().item() < 1e-5
                straddles = off % chunk != 0 and off // chunk != (off + len(s) - 1) // chunk
                assert same == (per_sample or not straddles), (attn, len(s))
                off += len(s)


def test_a_run_says_when_packing_would_change_the_attention_chunks(tmp_path, monkeypatch, capsys):
    """Where transformers chunks a packed row by token index (5.17), rows longer than the attention chunk are
    announced at the start of a run, with what keeps the chunks exact."""
    from moefit.data import packing
    from moefit.train import train

    llama4 = {"model_type": "llama4", "text_config": {"model_type": "llama4_text", "attention_chunk_size": 8192}}
    monkeypatch.setattr(packing, "packed_chunks_follow_positions", lambda: False)
    assert "data.packing: false" in chunked_packing_problem(llama4, 16384)
    assert chunked_packing_problem(llama4, 8192) is None
    assert chunked_packing_problem({"model_type": "qwen3_moe"}, 16384) is None
    with pytest.raises(MoefitError):  # stopped by a missing data file, after the warning
        train(output_dir=tmp_path / "run", **{"train.max_length": 1024, "data.train": str(tmp_path / "no.jsonl")})
    assert "warning: train.max_length 1024 is longer than the model's attention_chunk_size 512" in \
        capsys.readouterr().out  # the tiny model's
    monkeypatch.setattr(packing, "packed_chunks_follow_positions", lambda: True)
    assert chunked_packing_problem(llama4, 16384) is None


def test_packing_is_tight_and_keeps_every_token():
    lengths = [30, 50, 20, 64, 10, 33, 31, 1, 7]
    samples = [([i] * n, [IGNORE] + [i] * (n - 1)) for i, n in enumerate(lengths)]
    rows = pack(samples, 64)
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for s, _ in samples for t in s)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert len(rows) == math.ceil(sum(lengths) / 64)  # best fit reaches the bound here
    for r in rows:  # every sample starts at position 0 with no loss on its first token
        for j, p in enumerate(r["position_ids"]):
            if p == 0:
                assert r["labels"][j] == IGNORE


def test_truncation_is_counted_and_all_truncated_samples_dropped(tmp_path):
    long_user = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}
    long_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 80}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [short, long_user, long_answer, short])
    full = {i: len(TOK.apply_chat_template(r["messages"], tokenize=True)["input_ids"])
            for i, r in enumerate([short, long_user, long_answer])}
    b = build_datasets(DataConfig(train=str(path), eval_fraction=0.0), TOK, max_length=48, seed=0)
    rep = b.report
    assert rep.truncated == 2
    assert rep.truncated_tokens == full[1] - 48 + full[2] - 48
    assert [(d.line, "all trained tokens are past max_length" in d.reason) for d in rep.dropped_all_truncated] == [
        (2, True)]
    assert rep.train.samples == 3 and rep.samples_read == 4
    text = "\n".join(rep.summary_lines())
    assert "truncated: 2 samples" in text and "line 2" in text
    assert all(len(s["input_ids"]) <= 48 for s in b.train)


def test_bad_lines_stop_or_are_skipped_and_reported(tmp_path):
    lines = [json.dumps(r) for r in _records("chat", 6)]
    lines[2] = "{not json"
    lines[4] = json.dumps({"messages": [{"role": "wizard", "content": "x"}]})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"(?s)line 3: invalid JSON.*\n.*line 5: message 1: unknown role 'wizard'.*skip_invalid"):
        build_datasets(DataConfig(train=str(path)), TOK, max_length=128, seed=0)
    b = build_datasets(DataConfig(train=str(path), skip_invalid=True, eval_fraction=0.0), TOK, max_length=128, seed=0)
    assert [(s.line, s.source) for s in b.report.skipped] == [(3, str(path)), (5, str(path))]
    assert b.report.train.samples == 4
    d = b.report.to_dict()
    assert d["skipped_count"] == 2 and d["skipped"][0]["line"] == 3
    assert any("skipped: 2 bad records" in x and "line 5" in x for x in b.report.summary_lines())


def test_order_and_split_are_deterministic_and_eval_file(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", _records("text", 40))
    cfg = DataConfig(train=str(path), eval_fraction=0.2)
    a = build_datasets(cfg, TOK, max_length=64, seed=7)
    b = build_datasets(cfg, TOK, max_length=64, seed=7)
    c = build_datasets(cfg, TOK, max_length=64, seed=8)
    assert a.train == b.train and a.eval == b.eval
    assert fingerprint(a.train) == fingerprint(b.train) != fingerprint(c.train)
    assert a.train != c.train
    assert [e.sample.line for e in a.eval_samples] != [e.sample.line for e in c.eval_samples]
    assert {e.sample.line for e in a.eval_samples}.isdisjoint(e.sample.line for e in a.train_samples)
    ev = write_jsonl(tmp_path / "e.jsonl", _records("text", 5))
    d = build_datasets(DataConfig(train=str(path), eval=str(ev)), TOK, max_length=64, seed=7)
    assert (d.report.train.samples, d.report.eval.samples) == (40, 5)
    assert [f["role"] for f in d.report.files] == ["train", "eval"]
    nopack = build_datasets(DataConfig(train=str(path), eval=str(ev), packing=False), TOK, max_length=64, seed=7)
    assert nopack.report.train.sequences == 40
    assert all(s["position_ids"] == list(range(len(s["input_ids"]))) for s in nopack.train)


def test_resume_from_a_data_position_sees_exactly_the_rest():
    seqs = [{"input_ids": [i] * (1 + i % 3), "labels": [IGNORE] + [i] * (i % 3), "position_ids": list(range(1 + i % 3))}
            for i in range(10)]
    it = iterate_batches(seqs, 3, seed=5, pad_id=99)
    run = [next(it) for _ in range(9)]  # 4 batches per epoch (3+3+3+1): crosses two epoch boundaries
    epoch0 = sorted(int(t) for b, _ in run[:4] for t in b["input_ids"][:, 0])
    assert epoch0 == list(range(10))
    assert [p for _, p in run[:5]] == [DataPosition(0, 3), DataPosition(0, 6), DataPosition(0, 9),
                                       DataPosition(1, 0), DataPosition(1, 3)]
    first = [b["input_ids"][:, 0].tolist() for b, _ in run]
    assert first[:4] != first[4:8]  # each epoch has its own permutation
    for k in (0, 2, 3, 5):
        pos = DataPosition.from_dict(json.loads(json.dumps(run[k][1].to_dict())))
        resumed = iterate_batches(seqs, 3, seed=5, start=pos, pad_id=99)
        for b, p in run[k + 1:]:
            rb, rp = next(resumed)
            assert rp == p and all(torch.equal(rb[key], b[key]) for key in b)
    b, _ = run[0]
    rows = b["input_ids"].tolist()
    for row, lab, pos in zip(rows, b["labels"].tolist(), b["position_ids"].tolist(), strict=True):
        n = 1 + row[0] % 3
        assert row[n:] == [99] * (len(row) - n) and lab[n:] == [IGNORE] * (len(row) - n)
        assert pos[n:] == list(range(len(row) - n))
    with pytest.raises(DataError, match="past the end"):
        next(iterate_batches(seqs, 3, seed=5, start=DataPosition(0, 11)))
    with pytest.raises(DataError):
        DataPosition.from_dict({"epoch": 0})


def test_tokens_per_second_counts_the_datas_tokens_not_the_padding():
    """Micro-batches padded to one shape (engine.layer_graphs) or to their longest row: the trainer's token count
    (take_step, tokens/s, report.json) is the data's tokens, the padding left out."""
    from moefit.parallel.data_parallel import take_step
    from moefit.parallel.dist import DistContext

    seqs = [{"input_ids": [i] * (1 + i), "labels": [IGNORE] + [i] * i, "position_ids": list(range(1 + i))}
            for i in range(6)]
    for pad_to in (None, 16):
        it = iterate_batches(seqs, 2, seed=1, pad_id=99, shuffle=False, pad_to=pad_to)
        step = take_step(it, 3, DistContext(), lambda labels: int((labels != IGNORE).sum()))
        assert step.tokens == sum(len(s["input_ids"]) for s in seqs) == 21
        assert sum(int(b["input_ids"].numel()) for b in step.mine) == (2 * 16 * 3 if pad_to else 2 * (2 + 4 + 6))
    assert batch_tokens({"input_ids": torch.zeros(2, 5, dtype=torch.long)}) == 10  # an uncollated batch: every id


def test_one_shape_for_the_graphs_pads_an_epochs_last_batch_with_rows_of_padding():
    """With pad_to (the layer graphs replaying) every batch is batch_size rows of pad_to tokens: an epoch's last,
    shorter batch gets rows of padding only (no labels), so no second shape is captured; without, it stays short."""
    seqs = [{"input_ids": [i] * (1 + i), "labels": [IGNORE] + [i] * i, "position_ids": list(range(1 + i))}
            for i in range(6)]
    for pad_to in (None, 16):
        it = iterate_batches(seqs, 4, seed=1, pad_id=99, shuffle=False, pad_to=pad_to)
        (first, _), (last, _) = next(it), next(it)
        assert last["input_ids"].shape == ((4, 16) if pad_to else (2, 6))
        assert last.real_tokens == 5 + 6 and first.real_tokens == 1 + 2 + 3 + 4
        if pad_to:
            assert (last["input_ids"][2:] == 99).all() and (last["labels"][2:] == IGNORE).all()
            assert last["position_ids"][2:].tolist() == [list(range(16))] * 2


def test_embedded_data_set_and_tiny_tokenizer():
    tok = load_tokenizer("tiny")
    b = build_datasets(DataConfig(), tok, max_length=256, seed=0)
    assert [f["role"] for f in b.report.files] == ["train", "eval"]
    assert b.report.train.samples > 100 and b.report.eval.samples > 10 and not b.report.skipped


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(MoefitError, match="this model folder has no tokenizer files"):
        load_tokenizer(tmp_path)
