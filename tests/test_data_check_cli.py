"""`moefit data check` through the CLI entry point."""

from __future__ import annotations

import json
import re

import pytest

from moefit.cli import main
from tests.test_data_support import make_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer().save_pretrained(d)
    return str(d)


def _chat(i: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                    {"role": "assistant", "content": f"It is {2 * i}."}]})


def test_three_bad_lines_among_1000_are_named_exactly(tmp_path, capsys, model_dir):
    lines = [_chat(i) for i in range(1000)]
    lines[16] = lines[16][:-3]  # line 17: cut JSON
    lines[499] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})
    lines[998] = json.dumps({"messages": [{"role": "moderator", "content": "hi"}]})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")

    rc = main(["data", "check", str(path), "--model", model_dir])
    out = capsys.readouterr().out
    assert rc == 1
    named = sorted(int(n) for n in re.findall(r"line (\d+):", out))
    assert named == [17, 500, 999]
    assert f"{path} line 17: invalid JSON" in out
    assert f"{path} line 500: message 2: empty assistant turn" in out
    assert f"{path} line 999: message 1: unknown role 'moderator'" in out
    assert "format: chat" in out and "samples: 997 " in out and "turns: 1994" in out

    rc = main(["data", "check", str(path), "--model", model_dir, "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 1 and [b["line"] for b in d["bad_lines"]] == [17, 500, 999] and d["samples"] == 997


def test_valid_file_summary_show_and_truncation(tmp_path, capsys, model_dir):
    lines = [_chat(i) for i in range(20)] + [json.dumps({"messages": [
        {"role": "user", "content": "long " * 40}, {"role": "assistant", "content": "short"}]})]
    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rc = main(["data", "check", str(path), "--model", model_dir, "--max-length", "32", "--show", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{path}: valid" in out
    assert re.search(r"length in tokens: p50 \d+  p90 \d+  p99 \d+  max \d+", out)
    assert "truncation at max length 32: 1 samples cut" in out
    assert "would drop 1 samples with no trained token left: line 21" in out
    assert out.count("[[It is") == 2 and "[[It is 0.<|eot|>]]" in out and "[[It is 2.<|eot|>]]" in out
    assert "<|header_start|>assistant<|header_end|>\n\n[[" in out

    rc = main(["data", "check", str(path), "--model", model_dir, "--json", "--max-length", "4096"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["valid"] and d["truncated"] == 0 and d["samples"] == 21
    assert d["length"]["max"] >= d["length"]["p99"] >= d["length"]["p90"] >= d["length"]["p50"] > 0


def test_errors_are_one_paragraph(tmp_path, capsys, model_dir):
    rc = main(["data", "check", str(tmp_path / "nope.jsonl"), "--model", model_dir])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.jsonl: data file or folder not found" in err and "Traceback" not in err
