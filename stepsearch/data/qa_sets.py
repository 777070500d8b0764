"""Evaluation sets -> QAExample: FlashRAG JSONL (`id`, `question`, `golden_answers`) and original formats
(HotpotQA / 2WikiMultihopQA `context` + `supporting_facts`, MuSiQue, Bamboogle CSV). SPEC.md §4.4, §6.3.

The format is detected per record, so one code path serves HotpotQA, 2Wiki, MuSiQue, Bamboogle and the
FlashRAG NQ / TriviaQA / PopQA files.
"""
from __future__ import annotations

import csv
import os

from stepsearch.data.formats import QAExample, SupportDoc, dedup_keep_order
from stepsearch.data.io import DataError, Located, iter_records, require
from stepsearch.data.musique import ConvertStats, from_original

# data_source names (Search-R1 / FlashRAG spelling, which the evaluation groups by).
DATASETS = ("hotpotqa", "2wikimultihopqa", "musique", "bamboogle", "nq", "triviaqa", "popqa")


def sentence_separator(context: list) -> str:
    """HotpotQA sentences carry their own leading space (its paragraphs are "".join(sentences); a sentence
    without one continues the previous text, e.g. '"' + 'Billboard" ranked'), 2Wiki's carry none (" ".join).
    Decided once per record: "" if any non-first sentence starts with whitespace, else " "."""
    for _, sentences in context:
        if any(s[:1].isspace() for s in sentences[1:]):
            return ""
    return " "


def join_sentences(sentences: list[str], sep: str) -> str:
    return sep.join(sentences).strip()


def from_flashrag(loc: Located, index: int) -> QAExample:
    question = require(loc, "question", str, allow_empty=False)
    answers = require(loc, "golden_answers", list, allow_empty=False)
    if not all(isinstance(a, str) for a in answers):
        raise DataError(f"{loc.where}: field 'golden_answers' must be a list of str, got {answers!r:.120}")
    rid = loc.record.get("id", f"{index}")
    return QAExample(id=str(rid), question=question, answers=dedup_keep_order(a.strip() for a in answers if a.strip()),
                     where=loc.where)


def context_paragraphs(loc: Located, supporting_only: bool = False) -> dict[str, SupportDoc]:
    """title -> paragraph of a HotpotQA / 2Wiki record (first occurrence of a title wins), in context order;
    supporting_only keeps the titles named in supporting_facts, in that order."""
    context = require(loc, "context", list)
    for i, item in enumerate(context):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)
                and all(isinstance(x, str) for x in item[1])):
            raise DataError(f"{loc.where}: field 'context[{i}]' must be [title, [sentences...]], got {item!r:.120}")
    sep = sentence_separator(context)
    paragraphs: dict[str, SupportDoc] = {}
    for title, sentences in context:
        paragraphs.setdefault(title, SupportDoc(title, join_sentences(sentences, sep)))
    if not supporting_only:
        return paragraphs
    titles = []
    for i, fact in enumerate(require(loc, "supporting_facts", list)):
        if not (isinstance(fact, list) and fact and isinstance(fact[0], str)):
            raise DataError(f"{loc.where}: field 'supporting_facts[{i}]' must be [title, sentence_id], got {fact!r}")
        titles.append(fact[0])
    return {t: paragraphs[t] for t in dedup_keep_order(titles) if t in paragraphs}


def from_context_format(loc: Located) -> QAExample:
    """HotpotQA / 2Wiki original record: support docs are the paragraphs named in supporting_facts."""
    rid = loc.record.get("_id", loc.record.get("id"))
    if not isinstance(rid, str) or not rid:
        raise DataError(f"{loc.where}: missing field '_id' (or 'id')")
    question = require(loc, "question", str, allow_empty=False)
    answer = require(loc, "answer", str, allow_empty=False)
    docs = tuple(context_paragraphs(loc, supporting_only=True).values())
    return QAExample(id=rid, question=question, answers=(answer.strip(),), support_docs=docs, where=loc.where)


def iter_qa_records(path: str, show_progress: bool = True):
    """Records of a JSON/JSONL file, or of a Bamboogle CSV: with a `Question`/`Answer` header, or the authors'
    headerless comp-gap file (question in column 0, answer in column 4)."""
    if not str(path).endswith(".csv"):
        yield from iter_records(path, show_progress)
        return
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    has_header = "question" in header and "answer" in header
    q_col, a_col = (header.index("question"), header.index("answer")) if has_header else (0, 4)
    for lineno, row in enumerate(rows[1:] if has_header else rows, start=2 if has_header else 1):
        if len(row) <= max(q_col, a_col) or not row[q_col].strip() or not row[a_col].strip():
            raise DataError(f"{path}:{lineno}: expected the question in column {q_col} and the answer in column "
                            f"{a_col}, got {row!r:.120}")
        yield Located({"id": f"test_{lineno - (2 if has_header else 1)}", "question": row[q_col],
                       "golden_answers": [row[a_col].strip()]}, str(path), lineno)


def from_plain_qa(loc: Located, index: int) -> QAExample:
    """`{"question", "answer": str | [str, ...]}` records (qa_pairs files, R1-Searcher eval sets)."""
    question = require(loc, "question", str, allow_empty=False)
    answer = require(loc, "answer", (str, list), allow_empty=False)
    answers = [answer] if isinstance(answer, str) else answer
    if not all(isinstance(a, str) for a in answers):
        raise DataError(f"{loc.where}: field 'answer' must be a str or a list of str, got {answer!r:.120}")
    rid = loc.record.get("id", loc.record.get("idx", index))
    return QAExample(id=str(rid), question=question, answers=dedup_keep_order(a.strip() for a in answers if a.strip()),
                     where=loc.where)


def convert_qa_file(path: str) -> tuple[list[QAExample], ConvertStats]:
    """Convert one evaluation file; unanswerable MuSiQue records are skipped and counted."""
    stats, out = ConvertStats(), []
    for loc in iter_qa_records(path):
        stats.read += 1
        rec = loc.record
        if "golden_answers" in rec:
            ex = from_flashrag(loc, stats.read - 1)
        elif "question_decomposition" in rec:
            ex = from_original(loc)
        elif "context" in rec and "supporting_facts" in rec:
            ex = from_context_format(loc)
        elif "question" in rec and "answer" in rec:
            ex = from_plain_qa(loc, stats.read - 1)
        else:
            raise DataError(f"{loc.where}: unknown QA format: expected FlashRAG ('id', 'question', 'golden_answers'), "
                            "HotpotQA/2Wiki ('_id', 'question', 'answer', 'context', 'supporting_facts'), MuSiQue "
                            f"('question_decomposition', ...) or plain ('question', 'answer') fields; got {sorted(rec)}")
        if ex is None:
            stats.skipped_unanswerable += 1
            continue
        out.append(ex)
    stats.kept = len(out)
    return out, stats


def guess_dataset(path: str) -> str | None:
    """A data_source from a file name such as 'hotpotqa_dev.jsonl' or '2wiki_dev_50.jsonl', else None."""
    name = os.path.basename(path).lower()
    aliases = {"2wiki": "2wikimultihopqa", "hotpot": "hotpotqa", "musique": "musique", "bamboogle": "bamboogle",
               "triviaqa": "triviaqa", "popqa": "popqa", "nq": "nq"}
    for key, ds in aliases.items():
        if name.startswith(key):
            return ds
    return None
