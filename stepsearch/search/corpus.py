"""Passage corpus: read JSONL(.gz) rows in the three Search-R1 shapes and serve rows from a memory-mapped Arrow copy.

Accepted row shapes (one JSON object per line):
- `{"id", "contents": "\"Title\"\\ntext"}`  (wiki-18, FlashRAG)
- `{"id", "title", "content"}`               (Search-R1 README)
- `{"id", "title", "text"}`                  (Search-R1 index_builder)

Every served document row carries `id`, `title`, `text` and `contents` (`"Title"\\ntext`, the field Search-R1's
rollout client splits) plus the corpus' original fields. The text an index is built from is that served `contents`
(`index_text`): a row's own `contents` exactly as written (Search-R1 and FlashRAG encode it so), else
`"Title"\\ntext` made from `title` and `text`/`content`. For serving, `build_arrow_corpus` streams the JSONL into
an Arrow IPC file (columns `id`, `title`, `text`, `raw`); `ArrowCorpus` memory-maps it, so wiki-18's 21M passages are
looked up with a vectorized `take` and no Python object per passage is held.
"""
from __future__ import annotations

import gzip
import io
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

ARROW_SCHEMA = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("raw", pa.string())])


@dataclass(frozen=True)
class Passage:
    """One normalized corpus row. `raw` is the original JSON line (kept so served rows carry every original field)."""

    id: str
    title: str
    text: str
    raw: str

    @property
    def contents(self) -> str:
        return format_contents(self.title, self.text)


def format_contents(title: str, text: str) -> str:
    """Search-R1's `contents` field: the quoted title, a newline, then the text."""
    return f'"{title}"\n{text}'


def index_text(raw: str, title: str, text: str) -> str:
    """The text a passage is indexed (encoded, BM25-tokenized) as: the row's own `contents` string, unchanged, when
    it has one, else `format_contents(title, text)`. Equals the `contents` field `make_document` serves.

    Search-R1 and FlashRAG encode `contents` as it is; rebuilding it from the split title (quotes added to the 12%
    of wiki-18 rows whose first line has none) would change those vectors and ~6% of top-3 results."""
    contents = json.loads(raw).get("contents")
    return contents if isinstance(contents, str) else format_contents(title, text)


def split_contents(contents: str) -> tuple[str, str]:
    """Inverse of `format_contents`: first line (quotes stripped) is the title, the rest the text."""
    first, _, rest = contents.partition("\n")
    title = first.strip()
    if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
        title = title[1:-1]
    return title, rest


def parse_row(obj: object, where: str) -> tuple[str, str, str]:
    """Return `(id, title, text)` of one decoded JSON row; `where` ("file:line") names the row in errors."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
    if "id" not in obj:
        raise ValueError(f"{where}: row has no 'id' field (keys: {sorted(obj)}); every passage needs an id")
    pid = str(obj["id"])
    if "title" in obj and ("text" in obj or "content" in obj):
        body = obj["text"] if "text" in obj else obj["content"]
        title = obj["title"]
        if not isinstance(title, str) or not isinstance(body, str):
            raise ValueError(f"{where}: 'title' and 'text'/'content' must be strings")
        return pid, title, body
    if "contents" in obj:
        if not isinstance(obj["contents"], str):
            raise ValueError(f"{where}: 'contents' must be a string, got {type(obj['contents']).__name__}")
        title, text = split_contents(obj["contents"])
        return pid, title, text
    raise ValueError(
        f"{where}: unrecognized row shape (keys: {sorted(obj)}); expected "
        "{'id','contents'}, {'id','title','content'} or {'id','title','text'}"
    )


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_passages(path: str | os.PathLike) -> Iterator[Passage]:
    """Yield every passage of a JSONL or .jsonl.gz corpus; a malformed row raises ValueError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            pid, title, text = parse_row(obj, where)
            yield Passage(pid, title, text, line.rstrip("\n"))


def build_arrow_corpus(src: str | os.PathLike, dst: str | os.PathLike, batch_rows: int = 8192, progress=None) -> int:
    """Stream `src` (JSONL/.jsonl.gz) into an Arrow IPC file at `dst` (written atomically); return the row count.

    `progress`, if given, is called with the number of rows written after each batch (a tqdm `update`).
    """
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    n_rows = 0
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, ARROW_SCHEMA) as writer:
        cols: dict[str, list[str]] = {name: [] for name in ARROW_SCHEMA.names}
        for passage in iter_passages(src):
            for name in ARROW_SCHEMA.names:
                cols[name].append(getattr(passage, name))
            if len(cols["id"]) >= batch_rows:
                n_rows += _write_batch(writer, cols, progress)
        n_rows += _write_batch(writer, cols, progress)
    if n_rows == 0:
        tmp.unlink()
        raise ValueError(f"corpus {src} has no passages; expected one JSON object per line")
    os.replace(tmp, dst)
    return n_rows


def _write_batch(writer, cols: dict[str, list[str]], progress) -> int:
    n = len(cols["id"])
    if n:
        writer.write_batch(pa.record_batch([pa.array(cols[k], pa.string()) for k in ARROW_SCHEMA.names], ARROW_SCHEMA))
        for values in cols.values():
            values.clear()
        if progress is not None:
            progress(n)
    return n


class ArrowCorpus:
    """Memory-mapped, read-only passage table. `rows(indices)` returns served document rows (dicts)."""

    def __init__(self, path: str | os.PathLike, random_access: bool = False):
        """random_access=True (serving): the kernel reads only the pages a lookup touches. Without it, opening the
        table reads ahead through every record batch, i.e. the whole file (5.4 GB for 5M passages) from disk at
        start-up; with it, only the batches' metadata pages. False (the builder's sequential passes) keeps read-ahead.
        """
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"corpus table not found: {self.path}; rebuild the index with build_index")
        # A memory map + read_all is zero-copy: the OS pages passages in on demand.
        if random_access:
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._map.madvise(mmap.MADV_RANDOM)  # no read-ahead around the pages touched
            source = pa.BufferReader(pa.py_buffer(self._map))
        else:
            source = pa.memory_map(str(self.path), "r")
        self._table = pa.ipc.open_file(source).read_all()
        # rows() reads record batch by record batch: `Table.take` would concatenate each column's chunks on every call
        # (whole-column copies, and ArrowInvalid "offset overflow" once a string column passes 2 GiB).
        self._batches = self._table.to_batches()
        self._batch_starts = np.cumsum([0] + [b.num_rows for b in self._batches], dtype=np.int64)

    def __len__(self) -> int:
        return self._table.num_rows

    def column(self, name: str, start: int = 0, stop: int | None = None) -> list[str]:
        """Python strings of one column over rows [start, stop) (used to batch passages at index build)."""
        stop = len(self) if stop is None else stop
        return self._table.column(name).slice(start, stop - start).to_pylist()

    def index_texts(self, start: int = 0, stop: int | None = None) -> list[str]:
        """`index_text` of rows [start, stop): what the builder encodes and tokenizes (a Python list of the slice)."""
        stop = len(self) if stop is None else stop
        return [index_text(raw, title, text) for raw, title, text in zip(
            self.column("raw", start, stop), self.column("title", start, stop), self.column("text", start, stop))]

    def rows(self, indices) -> list[dict]:
        """Document rows for corpus row numbers `indices` (N,), in order: original fields + id/title/text/contents.
        Reads only the requested rows: one `take` inside each record batch that holds some of them."""
        idx = np.asarray(indices, dtype=np.int64).ravel()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"corpus row out of range [0, {len(self)}): {idx.min()}..{idx.max()}")
        batch_of = np.searchsorted(self._batch_starts, idx, side="right") - 1
        out: list[dict | None] = [None] * idx.size
        for b in np.unique(batch_of):
            where = np.flatnonzero(batch_of == b)
            picked = self._batches[b].take(int64_array(idx[where] - self._batch_starts[b]))
            cols = [picked.column(name).to_pylist() for name in ("raw", "id", "title", "text")]
            for pos, fields in zip(where.tolist(), zip(*cols)):
                out[pos] = make_document(*fields)
        return out


def int64_array(values: np.ndarray) -> pa.Array:
    """(N,) int64 numpy -> a pyarrow array over the same buffer. `pa.array(ndarray)` would do, but it imports pandas
    (~0.3-0.5 s on 2 cores) to ask whether the input is a pandas object: a cost on every server start."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def make_document(raw: str, pid: str, title: str, text: str) -> dict:
    """The served row: the original JSON object, with `id` (as str), `title`, `text` and `contents` filled in."""
    doc = json.loads(raw)
    doc["id"] = pid
    doc.setdefault("title", title)
    doc.setdefault("text", text)
    doc.setdefault("contents", format_contents(title, text))
    return doc
