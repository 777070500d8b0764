"""Training corpus builder: MuSiQue paragraphs -> retriever corpus JSONL (docs/method.md §3.5, issue 3 item 4).

Each corpus row is ``{"id", "title", "text", "contents"}`` with ``contents = '"' + title + '"\\n' + text`` (the
Search-R1 convention the retrieval server and the rollout parse). Passages are deduplicated on the exact
(title, text) pair and get a content-derived id, so ids are stable across runs, input order and machines,
and every support doc written by the converters is byte-for-byte a corpus passage.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from stepsearch.data.formats import read_parquet_table, support_doc_fields
from stepsearch.data.io import DataError, iter_records, write_jsonl_atomic
from stepsearch.data.musique import detect_musique_kind
from stepsearch.data.qa_sets import context_paragraphs as from_context_format
from stepsearch.search.corpus import format_contents, split_contents


def passage_id(title: str, text: str, prefix: str = "musi") -> str:
    """Stable id: prefix + the first 16 hex digits of sha1(title \\x1f text)."""
    digest = hashlib.sha1(f"{title}\x1f{text}".encode("utf-8")).hexdigest()[:16]
    return f"{prefix}-{digest}"


@dataclass
class CorpusStats:
    paragraphs_read: int = 0
    passages_written: int = 0

    @property
    def duplicates(self) -> int:
        return self.paragraphs_read - self.passages_written


def iter_paragraphs(path: str, supporting_only: bool = False) -> Iterator[tuple[str, str]]:
    """(title, text) pairs from original MuSiQue (every paragraph, or only supporting ones), the released
    StepSearch JSONL (`sub_support_docs`), HotpotQA / 2Wiki original records (`context`), a passage list (`{"title", "text"}` records), or a dataset parquet
    written by this package (`support_docs`)."""
    if str(path).endswith(".parquet"):
        for row in read_parquet_table(path, columns=["extra_info"]).column("extra_info").to_pylist():
            for doc in row["support_docs"]:
                yield support_doc_fields(doc)
        return
    for loc in iter_records(path):
        rec = loc.record
        if isinstance(rec.get("title"), str) and isinstance(rec.get("text"), str) and "question" not in rec:
            yield rec["title"], rec["text"]  # a passage list such as HippoRAG's [{"title", "text"}]
        elif "context" in rec and "supporting_facts" in rec:  # HotpotQA / 2Wiki original records
            for title, doc in from_context_format(loc, supporting_only).items():
                yield doc.title, doc.text
        elif detect_musique_kind(loc) == "original":
            for i, p in enumerate(loc.record.get("paragraphs", [])):
                if not isinstance(p, dict) or not isinstance(p.get("title"), str) or not isinstance(p.get("paragraph_text"), str):
                    raise DataError(f"{loc.where}: field 'paragraphs[{i}]' needs str 'title' and 'paragraph_text'")
                if p.get("is_supporting", False) or not supporting_only:
                    yield p["title"], p["paragraph_text"]
        else:
            for d in loc.record.get("sub_support_docs", []) or []:
                try:
                    yield support_doc_fields(d)
                except DataError as e:
                    raise DataError(f"{loc.where}: field 'sub_support_docs': {e}") from None


def corpus_rows(pairs: Iterable[tuple[str, str]], stats: CorpusStats, id_prefix: str = "musi") -> Iterator[dict]:
    """Deduplicate (title, text) pairs in first-seen order and render corpus rows."""
    seen: dict[str, tuple[str, str]] = {}
    for title, text in pairs:
        stats.paragraphs_read += 1
        pid = passage_id(title, text, id_prefix)
        if pid in seen:
            if seen[pid] != (title, text):  # a 64-bit prefix collision: never silently merge two passages
                raise DataError(f"passage id collision for {pid}: {seen[pid]!r} vs {(title, text)!r}")
            continue
        seen[pid] = (title, text)
        stats.passages_written += 1
        yield {"id": pid, "title": title, "text": text, "contents": format_contents(title, text)}


def build_corpus(inputs: list[str], out_path: str, supporting_only: bool = False, id_prefix: str = "musi") -> CorpusStats:
    """Write the deduplicated corpus JSONL for all paragraphs of `inputs` (atomically)."""
    stats = CorpusStats()
    pairs = (pair for path in inputs for pair in iter_paragraphs(path, supporting_only))
    write_jsonl_atomic(out_path, _nonempty(corpus_rows(pairs, stats, id_prefix), inputs, supporting_only))
    return stats


def _nonempty(rows: Iterator[dict], inputs: list[str], supporting_only: bool) -> Iterator[dict]:
    """The rows, or a DataError (before the output replaces anything) when the inputs hold no paragraph."""
    count = 0
    for count, row in enumerate(rows, start=1):
        yield row
    if count == 0:
        which = "supporting paragraphs" if supporting_only else "paragraphs"
        raise DataError(f"{', '.join(inputs)}: no {which} found; the corpus would be empty")


def load_corpus_pairs(path: str) -> Iterator[tuple[str, str, str]]:
    """(id, title, text) of every passage of a corpus JSONL in any of the accepted layouts:
    {"title","text"}, {"title","content"} or {"contents"} (docs/method.md §3.5)."""
    for loc in iter_records(path):
        rec = loc.record
        pid = str(rec.get("id", loc.line))
        if isinstance(rec.get("text"), str):
            yield pid, str(rec.get("title") or ""), rec["text"]
        elif isinstance(rec.get("content"), str):
            yield pid, str(rec.get("title") or ""), rec["content"]
        elif isinstance(rec.get("contents"), str):
            yield (pid, *split_contents(rec["contents"]))
        else:
            raise DataError(f"{loc.where}: corpus row needs 'text', 'content' or 'contents' (got {sorted(rec)})")
