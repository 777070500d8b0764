"""Reading records with file:line locations, and atomic writes (temp file + os.replace) that respect the umask.

Every bad-input error is a `DataError` (a ValueError) whose message starts with ``file:line`` and names the
field, so a user can open the offending line directly.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from verl.utils.fs import atomic_path, current_umask, new_file_mode  # noqa: F401 (re-exported for the data tools)


class DataError(ValueError):
    """Bad input data; the message names file:line and the field."""


@dataclass(frozen=True)
class Located:
    """One input record and where it came from (line = 1-based line for JSONL, record number for JSON)."""

    record: dict
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _progress(it, total: int | None, desc: str, show: bool):
    return tqdm(it, total=total, desc=desc, unit="rec", disable=not show, leave=False, mininterval=1.0)


def iter_records(path: str | os.PathLike, show_progress: bool = True) -> Iterator[Located]:
    """Yield the dict records of a JSONL file (one object a line) or a JSON file holding a list of objects.

    Blank lines are skipped. A malformed line, a non-object record or bytes that are not UTF-8 (a binary file)
    raise DataError with file:line; so does a file with no records at all (empty, blank lines only, or ``[]``).
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip()
    records = _iter_json_list(path, show_progress) if head.startswith(b"[") else _iter_jsonl(path, show_progress)
    count = 0
    for count, loc in enumerate(records, start=1):
        yield loc
    if count == 0:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines or []); "
                        "expected JSONL (one JSON object a line) or a JSON list of objects")


def decode_utf8(raw: bytes, path: str, lineno: int) -> str:
    """``raw`` as text; bytes that are not UTF-8 raise DataError with file:line (usually a binary file)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "is this a binary file? Expected JSONL or JSON") from None


def _iter_jsonl(path: str, show_progress: bool) -> Iterator[Located]:
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(path),
                                     disable=not show_progress or size < (8 << 20), leave=False) as bar:
        for lineno, raw in enumerate(f, start=1):
            bar.update(len(raw))
            line = decode_utf8(raw, path, lineno)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield Located(rec, path, lineno)


def _iter_json_list(path: str, show_progress: bool) -> Iterator[Located]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        decode_utf8(raw[raw.rfind(b"\n", 0, e.start) + 1:e.end], path, lineno)  # raises, with the column
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    for i, rec in enumerate(_progress(data, len(data), os.path.basename(path), show_progress and len(data) > 5000), 1):
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{i}: record {i} is a {type(rec).__name__}, expected a JSON object")
        yield Located(rec, path, i)


def require(loc: Located, field: str, kind: type | tuple[type, ...], allow_empty: bool = True) -> Any:
    """Return ``loc.record[field]``, raising DataError (file:line + field) if missing or of the wrong type."""
    if field not in loc.record:
        raise DataError(f"{loc.where}: missing field {field!r} (present: {sorted(loc.record)})")
    value = loc.record[field]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
        names = "/".join(k.__name__ for k in _as_tuple(kind))
        raise DataError(f"{loc.where}: field {field!r} must be {names}, got {type(value).__name__}: {_short(value)}")
    if not allow_empty and not value:
        raise DataError(f"{loc.where}: field {field!r} is empty")
    return value


def _as_tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _short(value: Any, n: int = 80) -> str:
    s = repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."


def check_unique_ids(items: list[tuple[str, str]]) -> None:
    """items: (id, where). Raise DataError naming both locations of the first duplicate id."""
    seen: dict[str, str] = {}
    for rid, where in items:
        if rid in seen:
            raise DataError(f"{where}: duplicate id {rid!r} (first seen at {seen[rid]}); ids must be unique "
                            "(fix the input, or let musi_search.py number the rows with --renumber_ids)")
        seen[rid] = where


def write_jsonl_atomic(path: str | os.PathLike, rows, show_progress: bool = False) -> int:
    """Write an iterable of dicts as JSONL atomically; returns the number of rows."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in _progress(rows, None, f"write {os.path.basename(str(path))}", show_progress):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file (markdown tables, reports) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, sort_keys: bool = False) -> None:
    """Write one JSON document atomically (indent 1, UTF-8 kept as is)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, sort_keys=sort_keys)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL (or JSON list) file; a bad line raises DataError with file:line."""
    return [loc.record for loc in iter_records(path, show_progress=False)]
