"""Which files become data, and how (moefit.data.records): empty files and files with no usable sample fail,
CSV/TSV and JSON lists are read, Parquet is refused by name, a folder reports every file it skips, and
`moefit data check run.yaml` checks the run's data as training reads it. Training reads through the same code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moefit.cli import main
from moefit.config import DataConfig
from moefit.data import build_datasets, load_tokenizer, read_data
from moefit.errors import DataError
from tests.test_data_formats import RECORDS
from tests.test_data_support import make_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


def _check(capsys, model_dir, *args: str) -> tuple[int, str, str]:
    rc = main(["data", "check", *args, "--model", model_dir])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out, out.err


@pytest.mark.parametrize("content, why, train_says", [
    (b"", "the file is empty", "no usable training sample: the file is empty"),
    (b"\n  \n\t\n", "the file is empty", "no usable training sample: the file is empty"),
    (b"[\n]\n", "no record in the file", "no usable training sample: no record in the file"),
    (b'{"text": ""}\n{"nope": 1}\n', "all 2 records are bad", "2 bad record"),
])
def test_no_usable_sample_fails(tmp_path, capsys, model_dir, tok, content, why, train_says):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    rc, out, _ = _check(capsys, model_dir, str(path))
    assert rc == 1 and out.startswith(f"{path}: no usable sample: {why}"), out
    rc, out, _ = _check(capsys, model_dir, str(path), "--json")
    assert rc == 1 and json.loads(out)["valid"] is False
    with pytest.raises(DataError, match=train_says):
        build_datasets(DataConfig(train=str(path)), tok, max_length=64, seed=0)


def test_samples_with_nothing_to_train_fail(tmp_path, capsys, model_dir):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "long " * 50},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    rc, out, _ = _check(capsys, model_dir, str(path), "--max-length", "16")
    assert rc == 1 and "no usable sample: 1 samples, none with a trained token left at max length 16" in out


def test_csv_and_tsv_are_read_like_jsonl(tmp_path, tok):
    (tmp_path / "a.csv").write_text(
        'instruction,input,output\n'
        'Translate,good morning,buongiorno\n'
        '"Write two lines","","first\nsecond"\n'           # a quoted cell over two lines: the record starts on line 3
        'too,many,cells,here\n'                              # line 5
        'Add,"1, 2",3\n', encoding="utf-8")                 # line 6
    (res,) = read_data(tmp_path / "a.csv")
    assert res.format == "instruction" and [s.line for s in res.samples] == [2, 3, 6]
    assert res.samples[1].messages[-1]["content"] == "first\nsecond"
    assert [(b.line, b.reason) for b in res.errors] == [(5, "4 cells, the header has 3 columns")]
    msgs = json.dumps(RECORDS["chat"]["messages"]).replace('"', '""')
    (tmp_path / "b.tsv").write_text(f'messages\tnote\n"{msgs}"\tx\n', encoding="utf-8")
    (res,) = read_data(tmp_path / "b.tsv")
    assert res.format == "chat" and res.samples[0].messages == RECORDS["chat"]["messages"] and not res.errors
    (tmp_path / "c.jsonl").write_text(json.dumps(RECORDS["instruction"]) + "\n")
    by_kind = {Path(r.path).suffix: r for r in read_data(tmp_path)}
    assert by_kind[".csv"].samples[0].messages == by_kind[".jsonl"].samples[0].messages  # one record, either way
    report = build_datasets(DataConfig(train=str(tmp_path / "a.csv"), skip_invalid=True, eval_fraction=0.0), tok,
                            max_length=64, seed=0).report
    assert report.train.samples == 3 and [str(b) for b in report.skipped] == [f"{tmp_path / 'a.csv'} line 5: 4 cells, "
                                                                              "the header has 3 columns"]


def test_json_lists_and_jsonl_in_either_suffix(tmp_path):
    recs = [RECORDS["text"], {"text": "Another one."}]
    (tmp_path / "list.jsonl").write_text(json.dumps(recs, indent=2))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    for name in ("list.jsonl", "lines.json"):
        (res,) = read_data(tmp_path / name)
        assert len(res.samples) == 2 and not res.errors, name


def test_parquet_and_unknown_files_are_refused_by_name(tmp_path, capsys, model_dir):
    pq = tmp_path / "train.parquet"
    pq.write_bytes(b"PAR1\x00\x00PAR1")
    rc, _, err = _check(capsys, model_dir, str(pq))
    assert rc == 2 and f"{pq}: Parquet files are not read by moefit" in err and "pd.read_parquet" in err
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps(RECORDS["text"]) + "\n")
    (folder / "more.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="more.parquet: Parquet files are not read"):  # not skipped: it is data
        read_data(folder)
    txt = tmp_path / "notes.txt"
    txt.write_text("just some notes\n")
    rc, _, err = _check(capsys, model_dir, str(txt))
    assert rc == 2 and f"{txt}: not a data file moefit reads (named .txt" in err


def test_folder_reports_every_skipped_file(tmp_path, capsys, model_dir, tok):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text(json.dumps(RECORDS["chat"]) + "\n")
    (tmp_path / "b.csv").write_text("text\nhello there\n")
    (tmp_path / "README.md").write_text("# my data\n")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    rc, out, _ = _check(capsys, model_dir, str(tmp_path))
    assert rc == 0 and "skipped 2 files of the data folder that are not data" in out
    assert "README.md; 1 hidden" in out
    d = json.loads(_check(capsys, model_dir, str(tmp_path), "--json")[1])
    assert sorted((Path(f["path"]).name, f.get("skipped")) for f in d["files"]) == [
        (".DS_Store", "hidden"), ("README.md", "not a data file: .md"), ("a.jsonl", None), ("b.csv", None)]
    report = build_datasets(DataConfig(train=str(tmp_path), eval_fraction=0.0), tok, max_length=64, seed=0).report
    assert report.train.samples == 2
    assert any(line.startswith("data train: skipped 2 files") for line in report.summary_lines())
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"holds no data file \(it holds 1 other files, e.g. notes.md\)"):
        read_data(empty)


def test_data_check_of_a_run_config(tmp_path, capsys, model_dir):
    data = tmp_path / "data"
    data.mkdir()
    long = {"messages": [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "yes"}]}
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in (RECORDS["chat"], long)) + "\n")
    (data / "eval.csv").write_text("prompt,completion\n2 + 2 =, 4\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {model_dir}\ndata:\n  train: data/train.jsonl\n  eval: data/eval.csv\n"
                   "train:\n  max_length: 64\n", encoding="utf-8")
    rc = main(["data", "check", str(cfg)])  # the tokenizer, paths (relative to the config) and max length of the run
    out = capsys.readouterr()
    assert rc == 0 and "== train data" in out.out and "== eval data" in out.out, out
    assert f"{data / 'train.jsonl'}: valid" in out.out and f"{data / 'eval.csv'}: valid" in out.out
    assert "truncation at max length 64: 1 samples cut" in out.out and "invalid JSON" not in out.out
    assert f"tokenizer of {model_dir} and max length 64" in out.err
    rc = main(["data", "check", str(cfg), "--max-length", "4096", "--json"])  # an option overrides the config
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["train"]["truncated"] == 0 and d["eval"]["samples"] == 1
    cfg.write_text("data:\n  train: data/train.jsonl\n  lr: 3\n", encoding="utf-8")
    assert main(["data", "check", str(cfg)]) == 2  # a broken run config is a config error, not bad data
    assert "unknown key 'data.lr'" in capsys.readouterr().err


def test_a_tokenizer_without_chat_template_is_one_error(tmp_path, capsys):
    d = tmp_path / "model"
    make_tokenizer(template=None).save_pretrained(d)
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(RECORDS["chat"]) for _ in range(300)) + "\n")
    rc = main(["data", "check", str(path), "--model", str(d)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "the tokenizer has no chat template" in err
    assert "300 multi-turn conversation records" in err and f"{path} line 1" in err
