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


def join_sentences(sentences: list[str]) -> str:
    """Join a paragraph's sentences: HotpotQA sentences carry their own leading space, 2Wiki's do not."""
    out = ""
    for s in sentences:
        if out and not out[-1].isspace() and s and not s[0].isspace():
            out += " "
        out += s
    return out.strip()


def from_flashrag(loc: Located, index: int) -> QAExample:
    question = require(loc, "question", str, allow_empty=False)
    answers = require(loc, "golden_answers", list, allow_empty=False)
    if not all(isinstance(a, str) for a in answers):
        raise DataError(f"{loc.where}: field 'golden_answers' must be a list of str, got {answers!r:.120}")
    rid = loc.record.get("id", f"{index}")
    return QAExample(id=str(rid), question=question, answers=dedup_keep_order(a.strip() for a in answers if a.strip()),
                     where=loc.where)


def from_context_format(loc: Located) -> QAExample:
    """HotpotQA / 2Wiki original record: support docs are the paragraphs named in supporting_facts."""
    rid = loc.record.get("_id", loc.record.get("id"))
    if not isinstance(rid, str) or not rid:
        raise DataError(f"{loc.where}: missing field '_id' (or 'id')")
    question = require(loc, "question", str, allow_empty=False)
    answer = require(loc, "answer", str, allow_empty=False)
    paragraphs = {}
    for i, item in enumerate(require(loc, "context", list)):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)):
            raise DataError(f"{loc.where}: field 'context[{i}]' must be [title, [sentences...]], got {item!r:.120}")
        paragraphs.setdefault(item[0], SupportDoc(item[0], join_sentences(item[1])))
    titles = []
    for i, fact in enumerate(require(loc, "supporting_facts", list)):
        if not (isinstance(fact, list) and fact and isinstance(fact[0], str)):
            raise DataError(f"{loc.where}: field 'supporting_facts[{i}]' must be [title, sentence_id], got {fact!r}")
        titles.append(fact[0])
    docs = tuple(paragraphs[t] for t in dedup_keep_order(titles) if t in paragraphs)
    return QAExample(id=rid, question=question, answers=(answer.strip(),), support_docs=docs, where=loc.where)


def iter_qa_records(path: str, show_progress: bool = True):
    """Records of a JSON/JSONL file, or of a Bamboogle-style CSV with `Question`/`Answer` columns."""
    if not str(path).endswith(".csv"):
        yield from iter_records(path, show_progress)
        return
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
            missing = [c for c in ("Question", "Answer") if c not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing CSV column(s) {missing}; expected Question, Answer")
            yield Located({"id": f"test_{lineno - 2}", "question": row["Question"], "golden_answers": [row["Answer"]]},
                          str(path), lineno)


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
        else:
            raise DataError(f"{loc.where}: unknown QA format: expected FlashRAG ('id', 'question', 'golden_answers'), "
                            "HotpotQA/2Wiki ('_id', 'question', 'answer', 'context', 'supporting_facts') or MuSiQue "
                            f"('question_decomposition', ...) fields; got {sorted(rec)}")
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
