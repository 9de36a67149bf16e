"""Readers, format detection and validation: every bad record is reported with file and line."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moefit.data.check import check_data
from moefit.data.formats import enforce_policy, read_data, read_file
from moefit.errors import DataError
from tests.test_data_support import make_tokenizer

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Bye!"}]}
RECORDS = {
    "text": {"text": "Plain text to learn."},
    "instruction": {"instruction": "Translate", "input": "good morning", "output": "buongiorno"},
    "chat": CHAT,
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
                 "system": "Be brief."},
    "prompt_completion": {"prompt": "2 + 2 =", "completion": " 4"},
}


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return p


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_each_format_is_detected_and_normalised(tmp_path, fmt):
    p = _write(tmp_path, "d.jsonl", [json.dumps(RECORDS[fmt])] * 3)
    (res,) = read_data(p)
    assert res.format == fmt and not res.errors
    assert [s.line for s in res.samples] == [1, 2, 3]
    s = res.samples[0]
    if fmt == "text":
        assert s.text == "Plain text to learn." and s.messages is None
    else:
        assert s.messages[-1]["role"] == "assistant" and all(set(m) == {"role", "content"} for m in s.messages)


def test_normal_forms():
    def msgs(rec, fmt, tmp=None):
        from moefit.data.formats import normalize
        return normalize(rec, fmt)[1]

    assert msgs(RECORDS["instruction"], "instruction") == [
        {"role": "user", "content": "Translate\n\ngood morning"}, {"role": "assistant", "content": "buongiorno"}]
    assert msgs(RECORDS["sharegpt"], "sharegpt") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]
    assert msgs({"prompt": [{"role": "user", "content": "Q"}],
                 "completion": [{"role": "assistant", "content": "A"}]}, "prompt_completion") == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert msgs({"instruction": "I", "output": "O", "history": [["q1", "a1"]]}, "instruction") == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "I"}, {"role": "assistant", "content": "O"}]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c"}]}
    assert msgs(parts, "chat")[0]["content"] == "ab"


def test_bad_lines_name_file_line_and_reason(tmp_path):
    good = json.dumps(CHAT)
    lines = [
        good,
        '{"messages": [{"role": "user", "content": "x"} {"role": "assistant"}]}',  # 2: invalid JSON
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),  # 3
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}),  # 4
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}),  # 5
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',  # 6: invalid UTF-8
        "",  # 7: blank, not an error
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 8: no assistant turn
        json.dumps(["not", "an", "object"]),  # 9
        json.dumps({"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "a"}]}),
        good,
    ]
    p = _write(tmp_path, "data.jsonl", lines)
    res = read_file(p)
    assert res.format == "chat" and res.blank_lines == 1
    assert [s.line for s in res.samples] == [1, 11]
    reasons = {b.line: b.reason for b in res.errors}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 8, 9, 10]
    col = lines[1].index('{"role": "assistant"') + 1
    assert reasons[2] == f"invalid JSON (Expecting ',' delimiter at column {col})"
    assert "must be a string, got int" in reasons[3]
    assert "unknown role 'robot'" in reasons[4]
    assert "empty assistant turn" in reasons[5]
    bad_byte_col = lines[5].index(b"\xff") + 1
    assert reasons[6] == f"invalid UTF-8 (byte 0xff at column {bad_byte_col})"
    assert "no assistant turn" in reasons[8]
    assert "expected a JSON object, got list" in reasons[9]
    assert "lone surrogate" in reasons[10]
    assert str(res.errors[0]) == f"{p} line 2: {reasons[2]}"

    with pytest.raises(DataError) as e:
        enforce_policy(res.errors, skip_invalid=False)
    msg = str(e.value)
    assert msg.startswith("8 bad record(s)") and f"{p} line 10:" in msg and "data.skip_invalid: true" in msg
    enforce_policy(res.errors, skip_invalid=True)  # lets them through; the caller reports them


def test_policy_lists_the_first_ten(tmp_path):
    p = _write(tmp_path, "d.jsonl", ["{bad"] * 25)
    with pytest.raises(DataError) as e:
        enforce_policy(read_file(p).errors, skip_invalid=False)
    msg = str(e.value)
    assert "line 10:" in msg and "line 11:" not in msg and "and 15 more" in msg


def test_json_array_keeps_line_numbers_and_folder(tmp_path):
    recs = [RECORDS["instruction"], {"instruction": "x", "output": 3}, RECORDS["instruction"]]
    text = "[\n" + ",\n".join(json.dumps(r, indent=2) for r in recs) + "\n]\n"
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "a.json"
    p.write_text(text)
    res = read_file(p)
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line == "{"]
    assert [s.line for s in res.samples] == [starts[0], starts[2]]
    assert [b.line for b in res.errors] == [starts[1]] and "'output' must be a string" in res.errors[0].reason
    _write(tmp_path, "b.jsonl", [json.dumps(RECORDS["text"])])
    results = read_data(tmp_path)
    assert [(r.path.endswith("b.jsonl"), r.format) for r in results] == [(True, "text"), (False, "instruction")]
    broken = tmp_path / "c.json"
    broken.write_text('[\n {"text": "a"},\n {"text": }\n]')
    (r,) = read_data(broken)
    assert r.errors[0].line == 3 and "invalid JSON" in r.errors[0].reason


def test_forced_format_and_unknown_records(tmp_path):
    p = _write(tmp_path, "d.jsonl", [json.dumps(RECORDS["text"]), json.dumps(RECORDS["chat"])])
    (res,) = read_data(p, "text")
    assert [s.line for s in res.samples] == [1]
    assert res.errors[0].line == 2 and "not a text record" in res.errors[0].reason
    q = _write(tmp_path, "q.jsonl", [json.dumps({"question": "a", "answer": "b"})])
    (res,) = read_data(q)
    assert res.format is None and "unknown record format" in res.errors[0].reason
    with pytest.raises(DataError, match="not found"):
        read_data(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"the folder holds no data file\. moefit reads JSONL"):
        read_data(tmp_path / "empty")


# --------------------------------------------------------------------------------------------- property test

_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(lambda s: s.strip())


@st.composite
def good_line(draw):
    n_turns = draw(st.integers(1, 3))
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(_text)})
    for _ in range(n_turns):
        msgs += [{"role": "user", "content": draw(_text)}, {"role": "assistant", "content": draw(_text)}]
    return json.dumps({"messages": msgs}, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def bad_line(draw):
    good = json.loads(draw(good_line()))
    kind = draw(st.sampled_from(["cut", "type", "role", "empty", "utf8", "not_object", "no_assistant", "surrogate",
                                 "missing_content"]))
    msgs = good["messages"]
    if kind == "cut":
        raw = json.dumps(good).encode()
        return raw[: draw(st.integers(1, len(raw) - 1))].rstrip(b" \t\r\n") or b"{"
    if kind == "utf8":
        raw = json.dumps(good).encode()
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])) + raw[at:]
    if kind == "not_object":
        return json.dumps(draw(st.sampled_from([[1, 2], "text", 3, None, msgs]))).encode()
    i = draw(st.integers(0, len(msgs) - 1))
    if kind == "type":
        msgs[i]["content"] = draw(st.sampled_from([1, 2.5, True, {"a": 1}, ["x"]]))
    elif kind == "role":
        msgs[i]["role"] = draw(st.sampled_from(["robot", "User", "", "bot", 3]))
    elif kind == "empty":
        a = [j for j, m in enumerate(msgs) if m["role"] == "assistant"]
        msgs[draw(st.sampled_from(a))]["content"] = draw(st.sampled_from(["", " ", "\n\t"]))
    elif kind == "no_assistant":
        good["messages"] = [m for m in msgs if m["role"] != "assistant"]
    elif kind == "surrogate":
        msgs[i]["content"] = "a\ud83d"
    elif kind == "missing_content":
        del msgs[i]["content"]
    return json.dumps(good).encode()


_TOK = make_tokenizer()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.data()), min_size=1, max_size=25))
def test_every_bad_line_reported_every_good_line_kept(tmp_path_factory, plan):
    lines, bad_at, good_at = [], [], []
    for lineno, (is_bad, data) in enumerate(plan, start=1):
        lines.append(data.draw(bad_line() if is_bad else good_line()))
        (bad_at if is_bad else good_at).append(lineno)
    p = tmp_path_factory.mktemp("prop") / "data.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    (res,) = read_data(p)
    assert [b.line for b in res.errors] == bad_at
    assert [s.line for s in res.samples] == good_at
    for s in res.samples:
        assert s.messages == json.loads(lines[s.line - 1])["messages"]
    # and through the whole check (rendering every kept sample with the chat template)
    report = check_data(p, _TOK, max_length=4096)
    assert [b.line for b in report.bad] == bad_at
    assert [e.sample.line for e in report.encoded] == good_at
    assert all(e.loss_tokens > 0 for e in report.encoded)
