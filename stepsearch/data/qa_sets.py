"""Evaluation sets -> QAExample: FlashRAG JSONL (`id`, `question`, `golden_answers`) and original formats
(HotpotQA / 2WikiMultihopQA `context` + `supporting_facts`, MuSiQue, Bamboogle CSV), plus plain JSON / JSONL /
CSV sets whose fields are named by the user (`FieldMap`, docs/data.md "Named fields").

The format is detected per record, so one code path serves HotpotQA, 2Wiki, MuSiQue, Bamboogle and the
FlashRAG NQ / TriviaQA / PopQA files. With a FieldMap every record is read through the named fields instead.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from stepsearch.data.formats import QAExample, SupportDoc, dedup_keep_order
from stepsearch.data.io import DataError, Located, iter_records, require
from stepsearch.data.musique import (REF, ConvertStats, from_original, key_alternatives, resolve_refs,
                                     with_final_aliases)

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


@dataclass(frozen=True)
class FieldMap:
    """Which fields (JSON/JSONL keys, or CSV header columns) of a plain QA set hold what.

    question: the question (str). answer: the answer, a str or a list of str (gold first, then aliases).
    id: the record id (default: the record's `id`/`idx`, else its position). decomposition: fields holding the
    sub-questions, in hop order; each holds a str (one sub-question; empty = no step) or a list of str /
    {"question", "answer"} objects. Every step becomes one search-key group, with `#k` replaced by sub-answer k,
    as for MuSiQue's question_decomposition.
    """

    question: str = "question"
    answer: str = "answer"
    id: str | None = None
    decomposition: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, where: str) -> "FieldMap":
        """'question=Q,answer=A,id=I,decomposition=D1+D2' (any subset) -> FieldMap; `where` names the option."""
        kw: dict = {}
        for part in text.split(","):
            key, sep, value = (x.strip() for x in part.partition("="))
            if not sep or not value or key not in cls.__dataclass_fields__ or key in kw:
                raise ValueError(f"{where}: bad field mapping {part!r} in {text!r}; write KEY=FIELD pairs joined by "
                                 f"',' with KEY in {list(cls.__dataclass_fields__)}, each at most once")
            kw[key] = tuple(v.strip() for v in value.split("+") if v.strip()) if key == "decomposition" else value
        return cls(**kw)

    def named(self) -> list[tuple[str, str]]:
        """(role, field) of every field the records must have."""
        out = [("question", self.question), ("answer", self.answer)] + ([("id", self.id)] if self.id else [])
        return out + [("decomposition", f) for f in self.decomposition]


def iter_named_csv(path: str, fields: FieldMap):
    """Records of a CSV with a header row, as {column: cell}; a named column missing from the header raises
    DataError at path:1 naming it."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        for role, name in fields.named():
            if name not in header:
                raise DataError(f"{path}:1: the header has no column {name!r} (the {role} field); "
                                f"columns: {header}")
        start = reader.line_num + 1
        for row in reader:
            if any(c.strip() for c in row):
                if len(row) != len(header):
                    raise DataError(f"{path}:{start}: {len(row)} cells, the header has {len(header)}: {row!r:.120}")
                yield Located(dict(zip(header, row)), path, start)
            start = reader.line_num + 1


def _decomposition_steps(loc: Located, name: str) -> list[tuple[str, str | None, str]]:
    """(sub-question, sub-answer or None, field path) of every step in decomposition field `name`."""
    value = require(loc, name, (str, list))
    items = [value] if isinstance(value, str) else value
    steps = []
    for i, item in enumerate(items):
        at = name if isinstance(value, str) else f"{name}[{i}]"
        if isinstance(item, dict):
            lower = {str(k).lower(): v for k, v in item.items()}
            question, answer = lower.get("question"), lower.get("answer")
            if not isinstance(question, str) or not (answer is None or isinstance(answer, str)):
                raise DataError(f"{loc.where}: field {at!r} needs a str 'question' (and a str 'answer' if any), "
                                f"got {item!r:.120}")
        elif isinstance(item, str):
            question, answer = item, None
        else:
            raise DataError(f"{loc.where}: field {at!r} must be a sub-question (str) or a {{question, answer}} "
                            f"object, got {type(item).__name__}: {item!r:.80}")
        if question.strip():
            steps.append((question, answer.strip() if answer and answer.strip() else None, at))
    return steps


def decomposition_keys(loc: Located, fields: FieldMap) -> tuple[tuple[tuple[str, ...], ...],
                                                                tuple[tuple[str, ...], ...]]:
    """(search-key groups, sub-answers) of a record's named decomposition: one group per step, its `#k`
    replaced by the answer of step k, exactly as MuSiQue's (`musique.resolve_refs`, `key_alternatives`).
    Sub-answers are one tuple per step: (answer,), or () for a step given without an answer."""
    steps = [s for name in fields.decomposition for s in _decomposition_steps(loc, name)]
    groups, sub_answers = [], []
    for s, (question, answer, at) in enumerate(steps):
        for k in map(int, REF.findall(question)):
            if not 1 <= k <= s or sub_answers[k - 1] is None:
                why = f"step #{k} has no answer" if 1 <= k <= s else f"only steps #1..#{s} come before it"
                raise DataError(f"{loc.where}: field {at!r}: {question!r} refers to #{k}, but {why}")
        groups.append(key_alternatives(resolve_refs(question, sub_answers, s, loc.where)))
        sub_answers.append(answer)
    return tuple(groups), tuple((a,) if a else () for a in sub_answers)


def from_named_fields(loc: Located, index: int, fields: FieldMap) -> QAExample:
    """One record of a plain QA set read through `fields` (missing or mistyped fields: DataError, file:line)."""
    question = require(loc, fields.question, str, allow_empty=False)
    answer = require(loc, fields.answer, (str, list), allow_empty=False)
    answers = [answer] if isinstance(answer, str) else answer
    if not all(isinstance(a, str) for a in answers) or not any(a.strip() for a in answers):
        raise DataError(f"{loc.where}: field {fields.answer!r} must be a non-empty str or list of str, "
                        f"got {answer!r:.120}")
    if fields.id:
        rid = require(loc, fields.id, (str, int))
    else:
        rid = loc.record.get("id", loc.record.get("idx", index))
    keys, sub_answers = decomposition_keys(loc, fields)
    answers = dedup_keep_order(a.strip() for a in answers if a.strip())
    return QAExample(id=str(rid), question=question.strip(), answers=answers, search_keys=keys,
                     where=loc.where, sub_answers=with_final_aliases(sub_answers, answers))


def convert_qa_file(path: str, fields: FieldMap | None = None) -> tuple[list[QAExample], ConvertStats]:
    """Convert one evaluation file; unanswerable MuSiQue records are skipped and counted. With `fields`, every
    record is read through the named fields (JSON / JSONL, or a CSV with a header row)."""
    stats, out = ConvertStats(), []
    if fields is not None:
        records = iter_named_csv(path, fields) if str(path).endswith(".csv") else iter_records(path)
        for loc in records:
            stats.read += 1
            out.append(from_named_fields(loc, stats.read - 1, fields))
        stats.kept = len(out)
        return out, stats
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
                            f"('question_decomposition', ...) or plain ('question', 'answer') fields; got "
                            f"{sorted(rec)}. Name other fields with --question_field/--answer_field (docs/data.md)")
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
