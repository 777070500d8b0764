"""The ``<information>`` document format (docs/method.md §2.3, item 7) and its parser, plus document field access.

Format, per retrieved doc of rank i = 1..k:  ``Doc i<## Title: {title} ##> {body}`` followed by "\\n".
The rollout renders observations with :func:`format_docs`; the reward and the scoring CLI read them back with
:func:`parse_information_blocks`. Unlike the released parser (docs/method.md §1.6), a doc's body here stops at the next
``Doc k<## Title:`` header, so it never carries the next doc's rank label.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from stepsearch.search.corpus import split_contents

__all__ = [
    "format_docs", "format_docs_with_spans", "parse_information_blocks", "rounds_from_response", "doc_title_text",
    "support_doc_text", "support_doc_title_text", "policy_text",
]

# One search round: a <search> span (that does not itself contain </search>) followed by whitespace and an
# <information> block. Rounds whose search produced no <information> (forced final turn) do not match.
_ROUND_RE = re.compile(r"<search>((?:(?!</search>).)*)</search>\s*<information>(.*?)</information>", re.DOTALL)
_DOC_HEADER_RE = re.compile(r"(?m)^Doc (\d+)<## Title: (.*?) ##>")
# Text the environment injects into a response: <information> blocks and <warning> messages (invalid action, final
# turn, retrieval error). An unclosed block runs to the end (a cut response).
_INJECTED_RE = re.compile(r"<information>.*?(?:</information>|\Z)|<warning>.*?(?:</warning>|\Z)", re.DOTALL)


def doc_title_text(doc: Mapping[str, Any], where: str = "doc") -> tuple[str, str]:
    """(title, body text) of a corpus row or a retrieval hit ``{"document": row, "score": s}``.

    Prefers ``title`` + ``text``; else ``content``; else splits ``contents`` ("Title"\\ntext).
    """
    if not isinstance(doc, Mapping):
        raise TypeError(f"{where} must be a dict with 'title' and 'text' (or 'contents'), got {type(doc).__name__}")
    if "document" in doc and isinstance(doc["document"], Mapping):
        doc = doc["document"]
    for body_key in ("text", "content"):
        if isinstance(doc.get(body_key), str):
            title = doc.get("title")
            if not isinstance(title, str):
                title = split_contents(doc["contents"])[0] if isinstance(doc.get("contents"), str) else ""
            return title, doc[body_key]
    if isinstance(doc.get("contents"), str):
        title, text = split_contents(doc["contents"])
        return title, text.strip()
    raise KeyError(f"{where} has no 'text', 'content' or 'contents' field (keys: {sorted(doc)}); "
                   f"give each document a body text")


def support_doc_title_text(doc: Any, where: str = "support_docs") -> tuple[str, str]:
    """(title, body text) of one gold document: a string (no title), the released ``{title, paragraph_text}``, or
    a dict with ``text`` / ``content`` / ``contents``. A parquet holding both layouts has ``paragraph_text=None`` in
    our rows and ``text=None`` in the released ones; the string field wins."""
    if isinstance(doc, str):
        return "", doc
    if isinstance(doc, Mapping):
        if isinstance(doc.get("paragraph_text"), str):
            return doc.get("title") or "", doc["paragraph_text"]
        return doc_title_text(doc, where)
    raise TypeError(f"{where} must be a string or a dict with 'paragraph_text' or 'text', "
                    f"got {type(doc).__name__}: {doc!r}")


def support_doc_text(doc: Any, where: str = "support_docs") -> str:
    """Body text of one gold document (title dropped: similarity uses the body only, docs/method.md §1.6)."""
    return support_doc_title_text(doc, where)[1]


def format_docs(docs: Sequence[Mapping[str, Any]]) -> str:
    """Render retrieved docs (corpus rows or ``{"document", "score"}`` hits) as
    ``Doc i<## Title: {title} ##> {body}\\n`` for i = 1..k, concatenated (docs/method.md §2.3 item 7)."""
    return format_docs_with_spans(docs)[0]


def format_docs_with_spans(docs: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """``format_docs(docs)`` and, per doc, the [start, end) character span of its body text in that string (so
    a cut of the rendered text can be mapped back to how much of each doc was shown)."""
    parts, spans, offset = [], [], 0
    for i, doc in enumerate(docs, start=1):
        title, text = doc_title_text(doc, f"docs[{i - 1}]")
        head = f"Doc {i}<## Title: {title} ##> "
        spans.append((offset + len(head), offset + len(head) + len(text)))
        parts.append(f"{head}{text}\n")
        offset += len(head) + len(text) + 1
    return "".join(parts), spans


def policy_text(response: str) -> str:
    """The response without the text the environment injected (``<information>`` blocks, ``<warning>``
    messages), i.e. what the policy itself wrote. A warning quotes ``<search> and </search>`` and
    ``<answer> and </answer>``; those must not count as the policy's searches or answers."""
    return _INJECTED_RE.sub(" ", response)


def _parse_block(body: str) -> list[dict]:
    """Docs of one ``<information>`` body: each header ``Doc i<## Title: t ##>`` up to the next header."""
    text = body.strip()
    headers = list(_DOC_HEADER_RE.finditer(text))
    docs = []
    for n, h in enumerate(headers):
        end = headers[n + 1].start() if n + 1 < len(headers) else len(text)
        docs.append({"id": None, "title": h.group(2).strip(), "text": text[h.end():end].strip(),
                     "rank": int(h.group(1))})
    return docs


def parse_information_blocks(text: str) -> list[list[dict]]:
    """Docs of every search round in ``text`` (a response): one list per ``<search>…</search>`` followed by an
    ``<information>`` block, in order. Each doc is ``{"id": None, "title", "text", "rank"}``; ids are not in the
    text, so redundancy falls back to comparing normalized title + text."""
    return [_parse_block(m.group(2)) for m in _ROUND_RE.finditer(text)]


def rounds_from_response(text: str) -> list[dict]:
    """``[{"query", "docs"}]`` per search round of a response in our format (the rollout's ``rounds`` shape)."""
    return [{"query": m.group(1).strip(), "docs": _parse_block(m.group(2))} for m in _ROUND_RE.finditer(text)]
