"""Read data files (or a folder of them; moefit.data.records splits files into records), detect the format per
file, validate every record.

Every record becomes a `Sample`: either plain `text` or a list of chat `messages` (role/content, roles
system/user/assistant). A record that cannot be used becomes a `BadLine` naming the file, the line and why;
nothing is dropped without one.

Formats (the keys that identify them):
- text: ``{"text": ...}``
- instruction (Alpaca / LLaMA-Factory): ``{"instruction", "input"?, "output", "system"?, "history"?}``
- chat (OpenAI / TRL): ``{"messages": [{"role", "content"}, ...]}``
- sharegpt (LLaMA-Factory / Axolotl): ``{"conversations": [{"from", "value"}, ...], "system"?}``
- prompt_completion (TRL): ``{"prompt", "completion"}`` as strings or as lists of messages
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .records import READ_SUFFIXES, BadLine, data_files, split_records

FORMATS = ("text", "instruction", "chat", "sharegpt", "prompt_completion")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
MAX_LISTED_ERRORS = 10


@dataclass
class Sample:
    """One validated record in normal form: `text` (all trained) or `messages` (a conversation)."""

    source: str
    line: int
    format: str
    text: str | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def turns(self) -> int:
        return 1 if self.messages is None else len(self.messages)


@dataclass
class FileResult:
    path: str
    format: str | None  # None when no record of the file could be read
    samples: list[Sample] = field(default_factory=list)
    errors: list[BadLine] = field(default_factory=list)
    blank_lines: int = 0
    empty: bool = False  # the file holds nothing but whitespace
    skipped: str | None = None  # why a file of a data folder was not read (hidden, not a data file)

    def to_dict(self) -> dict[str, Any]:
        """The per-file entry of the check and training reports."""
        d = {"path": self.path, "format": self.format, "samples": len(self.samples), "bad": len(self.errors),
             "blank_lines": self.blank_lines}
        return d | ({"empty": True} if self.empty else {}) | ({"skipped": self.skipped} if self.skipped else {})


class RecordError(ValueError):
    """A record that does not fit its format (the message becomes a BadLine reason)."""


# --------------------------------------------------------------------------------------------- detection

def detect_format(record: Any) -> str | None:
    """The format a record's keys identify, or None when they fit none."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


_FORMAT_KEYS = {
    "text": "'text'",
    "instruction": "'instruction' and 'output'",
    "chat": "'messages'",
    "sharegpt": "'conversations'",
    "prompt_completion": "'prompt' and 'completion'",
}


# --------------------------------------------------------------------------------------------- validation

def _string(value: Any, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"{what} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # valid JSON ("\ud800") but not text a tokenizer can take
        raise RecordError(f"{what} holds an invalid unicode escape (lone surrogate at character {e.start + 1})"
                          ) from None
    return value


def _content(value: Any, what: str) -> str:
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RecordError(f"{what} part {j + 1}: only {{\"type\": \"text\", \"text\": ...}} parts are "
                                  "supported")
            parts.append(part["text"])
        return "".join(parts)
    if value is None:
        raise RecordError(f"{what} is missing")
    return _string(value, what, allow_empty=True)


def _check_conversation(messages: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    if not messages:
        raise RecordError(f"'{key}' is an empty list")
    for i, m in enumerate(messages):
        where = f"message {i + 1}" if key in ("messages", "record") else f"{key} message {i + 1}"
        if m["role"] == "system" and i != 0:
            raise RecordError(f"{where}: a system message is only allowed first")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError(f"{where}: empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"'{key}' has no assistant turn (nothing to learn from)")
    return messages


def _messages(value: Any, key: str, role_key: str = "role", content_key: str = "content",
              role_map: dict[str, str] | None = None) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordError(f"'{key}' must be a list of messages, got {type(value).__name__}")
    out = []
    allowed = role_map if role_map is not None else {r: r for r in ROLES}
    for i, m in enumerate(value):
        where = f"message {i + 1}" if key == "messages" else f"{key} message {i + 1}"
        if not isinstance(m, dict):
            raise RecordError(f"{where} must be an object, got {type(m).__name__}")
        if role_key not in m:
            raise RecordError(f"{where} has no '{role_key}'")
        role = m[role_key]
        if not isinstance(role, str) or role not in allowed:
            raise RecordError(f"{where}: unknown role {role!r} (expected one of {', '.join(allowed)})")
        if content_key not in m:
            raise RecordError(f"{where} has no '{content_key}'")
        out.append({"role": allowed[role], "content": _content(m[content_key], where)})
    return out


def _system(record: dict[str, Any]) -> list[dict[str, str]]:
    system = record.get("system")
    if system is None or system == "":
        return []
    return [{"role": "system", "content": _string(system, "'system'")}]


def normalize(record: Any, fmt: str) -> tuple[str | None, list[dict[str, str]] | None]:
    """Validate `record` as `fmt`; return (text, None) or (None, messages). Raises RecordError."""
    if not isinstance(record, dict):
        hint = " (a file holding one JSON list of records is read as such when named .json)" if isinstance(
            record, list) else ""
        raise RecordError(f"expected a JSON object, got {type(record).__name__}{hint}")
    detected = detect_format(record)
    if detected != fmt and not (fmt == "text" and "text" in record):
        found = ", ".join(repr(k) for k in list(record)[:6]) or "no keys"
        raise RecordError(f"not a {fmt} record: needs {_FORMAT_KEYS[fmt]} (found {found})")
    if fmt == "text":
        return _string(record["text"], "'text'"), None
    if fmt == "chat":
        return None, _check_conversation(_messages(record["messages"], "messages"), "messages")
    if fmt == "sharegpt":
        conv = record["conversations"]
        if isinstance(conv, list) and conv and isinstance(conv[0], dict) and "from" not in conv[0]:
            msgs = _messages(conv, "conversations")  # some ShareGPT exports use role/content
        else:
            msgs = _messages(conv, "conversations", "from", "value", SHAREGPT_ROLES)
        if msgs and msgs[0]["role"] != "system":
            msgs = _system(record) + msgs
        return None, _check_conversation(msgs, "conversations")
    if fmt == "instruction":
        instruction = _string(record["instruction"], "'instruction'")
        extra = record.get("input")
        extra = "" if extra is None else _string(extra, "'input'", allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        history = record.get("history") or []
        if not isinstance(history, list):
            raise RecordError(f"'history' must be a list of [question, answer] pairs, got {type(history).__name__}")
        msgs = _system(record)
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise RecordError(f"'history' item {i + 1} must be a [question, answer] pair")
            msgs += [{"role": "user", "content": _string(pair[0], f"history {i + 1} question")},
                     {"role": "assistant", "content": _string(pair[1], f"history {i + 1} answer")}]
        msgs += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": _string(record["output"], "'output'")}]
        return None, _check_conversation(msgs, "record")
    if fmt == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):  # TRL conversational prompt-completion
            answer = _messages(completion, "completion")
            if not answer or any(m["role"] != "assistant" for m in answer):
                raise RecordError("'completion' must be a non-empty list of assistant messages")
            return None, _check_conversation(_messages(prompt, "prompt") + answer, "prompt+completion")
        msgs = [{"role": "user", "content": _string(prompt, "'prompt'")},
                {"role": "assistant", "content": _string(completion, "'completion'")}]
        return None, _check_conversation(msgs, "record")
    raise RecordError(f"unknown format {fmt!r}")  # pragma: no cover - guarded by the config schema


# --------------------------------------------------------------------------------------------- reading

def read_file(path: str | Path, fmt: str = "auto") -> FileResult:
    """Read and validate one data file (see moefit.data.records for the kinds); never raises on bad records
    (they land in `errors`)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read the data file ({e.strerror}).") from None
    split = split_records(p, raw)
    result = FileResult(path=str(p), format=None if fmt == "auto" else fmt, errors=split.errors,
                        blank_lines=split.blank_lines, empty=split.empty)
    records = split.records
    if result.format is None:
        for _, rec in records:
            if (found := detect_format(rec)) is not None:
                result.format = found
                break
    for lineno, rec in records:
        if result.format is None:
            keys = ", ".join(repr(k) for k in list(rec)[:6]) if isinstance(rec, dict) else type(rec).__name__
            result.errors.append(BadLine(str(p), lineno, f"unknown record format ({keys}); expected one of the "
                                         "keys text, instruction/output, messages, conversations, prompt/completion"))
            continue
        try:
            text, messages = normalize(rec, result.format)
        except RecordError as e:
            result.errors.append(BadLine(str(p), lineno, str(e)))
            continue
        result.samples.append(Sample(str(p), lineno, result.format, text, messages))
    result.errors.sort(key=lambda b: b.line)
    return result


def read_data(path: str | Path, fmt: str = "auto") -> list[FileResult]:
    """Every file a path names, read; in a folder, the files not read come last, each with why (`skipped`)."""
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; use auto or one of {', '.join(FORMATS)}.")
    files, skipped = data_files(path)
    return [read_file(f, fmt) for f in files] + [FileResult(s.path, None, skipped=s.reason) for s in skipped]


def skipped_files_line(files: list[dict[str, Any]], max_listed: int = 5) -> str | None:
    """From report entries (FileResult.to_dict): 'skipped 3 files of the data folder ...' naming them (hidden
    ones only counted), or None when nothing was skipped."""
    skipped = [f for f in files if f.get("skipped")]
    if not skipped:
        return None
    named = [Path(f["path"]).name for f in skipped if f["skipped"] != "hidden"]
    hidden = len(skipped) - len(named)
    parts = [", ".join(named[:max_listed]) + (f" and {len(named) - max_listed} more" if len(named) > max_listed
                                              else "")] if named else []
    parts += [f"{hidden} hidden"] if hidden else []
    return (f"skipped {len(skipped)} files of the data folder that are not data (moefit reads "
            f"{', '.join('*' + s for s in READ_SUFFIXES)}): {'; '.join(parts)}")


def enforce_policy(errors: list[BadLine], skip_invalid: bool) -> None:
    """The default policy: stop on any bad record, listing the first ones. skip_invalid lets them through."""
    if not errors or skip_invalid:
        return
    listed = "\n".join(f"  {b}" for b in errors[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    raise DataError(f"{len(errors)} bad record(s) in the data:\n{listed}{more}\n"
                    "Fix them, or set data.skip_invalid: true to skip them (they are then counted and listed "
                    "in the report).")
