"""From a path to raw records: which files a path names, and how each file's bytes split into (line, record).

Read: JSONL (one JSON value per line), JSON (a list of records, or one record; a `.json` file that is really JSONL
is read as JSONL, a `.jsonl` file holding one JSON list over several lines is read as that list), CSV and TSV (a header row names
the columns, which become the record's keys; a cell of a list-valued key such as `messages` holds JSON).
Refused by name, with what to do: Parquet, Arrow and spreadsheets (they need libraries moefit does not depend on).
In a folder, every other file is skipped and counted; nothing is left out without a word.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

READ_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
REFUSED = {".parquet": "Parquet", ".arrow": "Arrow", ".feather": "Feather", ".xlsx": "Excel", ".xls": "Excel"}
# CSV columns whose cells hold JSON (lists of messages, [question, answer] pairs).
JSON_LIST_COLUMNS = ("messages", "conversations", "history")
JSON_COLUMNS = (*JSON_LIST_COLUMNS, "prompt", "completion")
SUPPORTED = "JSONL (one JSON object per line), JSON (a list of objects), CSV or TSV (a header row naming the columns)"


@dataclass
class BadLine:
    """A record that cannot be used: where it is and why."""

    source: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source} line {self.line}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.source, "line": self.line, "reason": self.reason}


@dataclass
class Split:
    """A file's records with the line each starts on, and what could not be read."""

    records: list[tuple[int, Any]] = field(default_factory=list)
    errors: list[BadLine] = field(default_factory=list)
    blank_lines: int = 0
    empty: bool = False  # nothing but whitespace


@dataclass(frozen=True)
class Skipped:
    """A file in a data folder that is not read, and why."""

    path: str
    reason: str


def refuse(path: Path) -> DataError:
    kind = REFUSED[path.suffix.lower()]
    return DataError(
        f"{path}: {kind} files are not read by moefit (reading them needs pyarrow / pandas, which moefit does not "
        f"depend on). Convert it to JSONL, e.g. python -c \"import pandas as pd; pd.read_{_reader(path)}('{path}')"
        f".to_json('{path.with_suffix('.jsonl').name}', orient='records', lines=True, force_ascii=False)\", "
        "then point the data at the .jsonl file.")


def _reader(path: Path) -> str:
    return {".parquet": "parquet", ".arrow": "feather", ".feather": "feather"}.get(path.suffix.lower(), "excel")


def data_files(path: str | Path) -> tuple[list[Path], list[Skipped]]:
    """The files a path names: the file itself, or every readable file under a folder (sorted), with the files
    of the folder that are skipped. A Parquet/Arrow/Excel file is refused, alone or in a folder: training
    without part of the data would be a silent loss."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() in REFUSED:
            raise refuse(p)
        return [p], []
    if not p.is_dir():
        raise DataError(f"{p}: data file or folder not found. Set data.train to a JSONL/JSON/CSV file or a folder "
                        "of them.")
    files, skipped = [], []
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts):
            skipped.append(Skipped(str(f), "hidden"))
        elif f.suffix.lower() in REFUSED:
            raise refuse(f)
        elif f.suffix.lower() in READ_SUFFIXES:
            files.append(f)
        else:
            skipped.append(Skipped(str(f), f"not a data file: {f.suffix or 'no suffix'}"))
    if not files:
        listed = f" (it holds {len(skipped)} other files, e.g. {Path(skipped[0].path).name})" if skipped else ""
        raise DataError(f"{p}: the folder holds no data file{listed}. moefit reads {SUPPORTED}: files named "
                        f"{', '.join('*' + s for s in READ_SUFFIXES)}.")
    return files, skipped


def split_records(path: Path, raw: bytes) -> Split:
    """The records of one file, by its suffix (and, for JSON/JSONL, by whether it starts with a list)."""
    out = Split(empty=not raw.lstrip(b"\xef\xbb\xbf \t\r\n"))
    if out.empty:
        return out
    suffix = path.suffix.lower()
    if suffix not in READ_SUFFIXES and not _first_line_is_json(raw):
        raise DataError(f"{path}: not a data file moefit reads (named {suffix or 'without a suffix'}, and its first "
                        f"line is not JSON). moefit reads {SUPPORTED}.")
    if suffix in (".csv", ".tsv"):
        _csv_records(path, raw, out, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".json" or (not _first_line_is_json(raw, lone=True) and _json_list(raw)):
        _json_records(path, raw, out)
    else:
        _jsonl_records(path, raw, out)
    return out


def _first_line_is_json(raw: bytes, lone: bool = False) -> bool:
    """The first non-blank line is JSON on its own (or, unless `lone`, the whole file is one JSON list)."""
    line = next(x for x in raw.lstrip(b"\xef\xbb\xbf \t\r\n").split(b"\n") if x.strip())
    try:
        json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False if lone else _json_list(raw)
    return True


def _json_list(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8-sig")), list)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _jsonl_records(path: Path, raw: bytes, out: Split) -> None:
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            out.errors.append(BadLine(str(path), lineno,
                                      f"invalid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"))
            continue
        if lineno == 1:
            text = text.lstrip("\ufeff")
        if not text.strip():
            if lineno < raw.count(b"\n") + 1 or text:  # the empty string after a final newline is not a line
                out.blank_lines += 1
            continue
        try:
            out.records.append((lineno, json.loads(text)))
        except json.JSONDecodeError as e:
            out.errors.append(BadLine(str(path), lineno, f"invalid JSON ({e.msg} at column {e.colno})"))


def _json_records(path: Path, raw: bytes, out: Split) -> None:
    """A JSON file holds a list of records; each keeps the line its object starts on."""
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        out.errors.append(BadLine(str(path), lineno, f"invalid UTF-8 (byte 0x{raw[e.start]:02x})"))
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one JSON value per line in a .json file: JSONL
            _jsonl_records(path, raw, out)
            return
        out.errors.append(BadLine(str(path), e.lineno, f"invalid JSON ({e.msg} at column {e.colno}); "
                                  "the whole file is unreadable"))
        return
    if isinstance(doc, dict):
        out.records.append((1, doc))
        return
    if not isinstance(doc, list):
        out.errors.append(BadLine(str(path), 1, f"a .json data file must hold a list of records, "
                                  f"got {type(doc).__name__}"))
        return
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    for _ in doc:
        while text[pos] in " \t\r\n,":
            pos += 1
        item, end = decoder.raw_decode(text, pos)
        out.records.append((text.count("\n", 0, pos) + 1, item))
        pos = end


def _csv_records(path: Path, raw: bytes, out: Split, delimiter: str) -> None:
    """Header row = the record's keys; each row a record that starts on its line (a quoted cell may span
    lines). Cells of JSON_COLUMNS that hold a JSON list or object are parsed."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        out.errors.append(BadLine(str(path), lineno, f"invalid UTF-8 (byte 0x{raw[e.start]:02x}); save the file "
                                  "as UTF-8"))
        return
    limit = csv.field_size_limit(2**31 - 1)  # a long sample is one cell; restored below (process-wide setting)
    try:
        _csv_rows(path, text, out, delimiter)
    finally:
        csv.field_size_limit(limit)


def _csv_rows(path: Path, text: str, out: Split, delimiter: str) -> None:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except (StopIteration, csv.Error) as e:
        out.errors.append(BadLine(str(path), 1, f"no readable header row ({e})"))
        return
    if not any(header) or len(set(header)) != len(header):
        out.errors.append(BadLine(str(path), 1, f"the header row must name each column once, got {header}"))
        return
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            out.errors.append(BadLine(str(path), start, f"not readable as CSV ({e}); the rest of the file is "
                                      "not read"))
            return
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            out.blank_lines += 1
            continue
        if len(row) != len(header):
            out.errors.append(BadLine(str(path), line, f"{len(row)} cells, the header has {len(header)} columns"))
            continue
        record: dict[str, Any] = {}
        for key, cell in zip(header, row, strict=True):
            record[key] = cell
            if key in JSON_COLUMNS and cell.lstrip()[:1] in ("[", "{"):
                try:
                    record[key] = json.loads(cell)
                except json.JSONDecodeError as e:
                    if key in JSON_LIST_COLUMNS:  # prompt / completion may also be plain text that starts with [
                        out.errors.append(BadLine(str(path), line, f"column {key!r} holds invalid JSON ({e.msg})"))
                        break
        else:
            out.records.append((line, record))
