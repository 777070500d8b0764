"""The dataset row format (docs/CONTRACTS.md "Dataset rows", docs/method.md §4.3) and its parquet I/O.

A converter turns any input record into a `QAExample`; `to_row` renders it in the seed's format:

    {"data_source", "prompt": [{"role": "user", "content"}], "ability": "fact-reasoning",
     "reward_model": {"style": "rule", "ground_truth": {"target": [...], "search_keys": [[...], ...],
                                                        "sub_answers": [[...], ...]}},
     "extra_info": {"split", "index", "support_docs": [{"title", "text"}, ...]}, "id"}

`sub_answers` holds the gold answer of every decomposition step (one list of alternatives per hop, in hop order;
the "ow sub-answer" reward r_sub scores against it) and is [] when any step's answer is unknown. Rows written
before the field existed lack it; readers treat a missing or null `sub_answers` as [].

The parquet is written with an explicit arrow schema, so that empty `search_keys` / `support_docs`
(test splits) keep their list types and every file has the same schema.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from stepsearch.data.io import DataError, atomic_path
from stepsearch.data.prompts import make_prompt
from stepsearch.rewards.docs import support_doc_title_text

ABILITY = "fact-reasoning"

SUPPORT_DOC_TYPE = pa.struct([("title", pa.string()), ("text", pa.string())])
ROW_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([
        ("style", pa.string()),
        ("ground_truth", pa.struct([
            ("target", pa.list_(pa.string())),
            ("search_keys", pa.list_(pa.list_(pa.string()))),
            ("sub_answers", pa.list_(pa.list_(pa.string()))),
        ])),
    ])),
    ("extra_info", pa.struct([
        ("split", pa.string()),
        ("index", pa.int64()),
        ("support_docs", pa.list_(SUPPORT_DOC_TYPE)),
    ])),
    ("id", pa.string()),
])


@dataclass(frozen=True)
class SupportDoc:
    """A gold evidence passage; must equal a corpus passage (title and text) for information gain to work."""

    title: str
    text: str


@dataclass(frozen=True)
class QAExample:
    """One question, converted from any input format.

    answers: the gold answer first, then its aliases (deduplicated, order kept) -> ground_truth.target.
    search_keys: one group of alternative queries per sub-question (M groups x N_i queries).
    sub_answers: per decomposition step, its gold answer and aliases (an empty tuple: that step's answer is
    unknown) -> ground_truth.sub_answers.
    """

    id: str
    question: str
    answers: tuple[str, ...]
    search_keys: tuple[tuple[str, ...], ...] = ()
    support_docs: tuple[SupportDoc, ...] = ()
    where: str = ""  # file:line of the source record, for error messages
    sub_answers: tuple[tuple[str, ...], ...] = field(default=(), compare=False)  # per decomposition step


def dedup_keep_order(items) -> tuple[str, ...]:
    seen, out = set(), []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return tuple(out)


def row_sub_answers(ex: QAExample) -> list[list[str]]:
    """ground_truth.sub_answers of `ex`: one list of answers per hop, or [] unless every hop's answer is known
    (r_sub averages over the hops, so a hop without a gold answer would cap it below 1)."""
    hops = [[a for a in hop if a] for hop in ex.sub_answers]
    return hops if hops and all(hops) else []


def to_row(ex: QAExample, data_source: str, split: str, index: int, template: str = "paper",
           keep_evidence: bool = True) -> dict:
    """Render one example as a dataset row (the seed's format). keep_evidence=False empties keys, sub-answers
    and docs."""
    if not ex.answers:
        raise DataError(f"{ex.where}: example {ex.id!r} has no answer; ground_truth.target must be non-empty")
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": make_prompt(ex.question, template)}],
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": {
            "target": list(ex.answers),
            "search_keys": [list(g) for g in ex.search_keys] if keep_evidence else [],
            "sub_answers": row_sub_answers(ex) if keep_evidence else [],
        }},
        "extra_info": {
            "split": split,
            "index": int(index),
            "support_docs": [{"title": d.title, "text": d.text} for d in ex.support_docs] if keep_evidence else [],
        },
        "id": ex.id,
    }


def write_rows_parquet(rows: list[dict], path: str) -> None:
    """Write rows atomically with ROW_SCHEMA (never a partial parquet)."""
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


def read_parquet_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """A parquet file's table; a missing file, a file that is not parquet, or one with no rows is a DataError
    naming the file (not a bare pyarrow traceback)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path} does not exist")
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {str(e)[:200]})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows (an empty dataset); nothing to read")
    return table


def read_rows_parquet(path: str) -> list[dict]:
    """Read rows back as plain Python dicts (validating the format); an empty or unreadable file is a DataError."""
    rows = read_parquet_table(path).to_pylist()
    for i, row in enumerate(rows):
        validate_row(row, f"{path}:row {i}")
    return rows


def validate_row(row: dict, where: str) -> None:
    """Check one row against the seed format; raise DataError naming the field."""
    def need(obj, key, kind, ctx):
        if not isinstance(obj, dict) or key not in obj:
            raise DataError(f"{where}: missing field {ctx}{key!r}")
        if not isinstance(obj[key], kind):
            raise DataError(f"{where}: field {ctx}{key!r} must be {kind}, got {type(obj[key]).__name__}")
        return obj[key]

    need(row, "data_source", str, "")
    prompt = need(row, "prompt", list, "")
    if not prompt or not isinstance(prompt[0], dict) or not isinstance(prompt[0].get("content"), str):
        raise DataError(f"{where}: field 'prompt' must be [{{'role': 'user', 'content': str}}]")
    gt = need(need(row, "reward_model", dict, ""), "ground_truth", dict, "reward_model.")
    target = need(gt, "target", list, "reward_model.ground_truth.")
    if not target or not all(isinstance(t, str) for t in target):
        raise DataError(f"{where}: reward_model.ground_truth.target must be a non-empty list of str, got {target!r}")
    keys = need(gt, "search_keys", list, "reward_model.ground_truth.")
    if not all(isinstance(g, list) and all(isinstance(k, str) for k in g) for g in keys):
        raise DataError(f"{where}: reward_model.ground_truth.search_keys must be a list of lists of str")
    subs = gt.get("sub_answers")  # optional: rows written before the field existed lack it
    if subs is not None and not (isinstance(subs, list) and all(
            isinstance(h, list) and all(isinstance(a, str) for a in h) for h in subs)):
        raise DataError(f"{where}: reward_model.ground_truth.sub_answers must be a list of lists of str "
                        f"(one per hop), got {subs!r:.200}")
    extra = need(row, "extra_info", dict, "")
    need(extra, "index", int, "extra_info.")
    for j, d in enumerate(need(extra, "support_docs", list, "extra_info.")):
        try:
            support_doc_fields(d)
        except DataError:
            raise DataError(f"{where}: extra_info.support_docs[{j}] must be a str, {{'title','text'}} or the released "
                            f"{{'title','paragraph_text'}}, got {d!r:.200}") from None


def support_doc_fields(doc) -> tuple[str, str]:
    """(title, text) of a support doc (`stepsearch.rewards.docs.support_doc_title_text`: str, {'title','text'} or
    the released {'title','paragraph_text'}); a malformed one raises DataError naming it."""
    try:
        return support_doc_title_text(doc)
    except (TypeError, KeyError):
        raise DataError(f"support doc {doc!r:.200} must be a str or a dict with a 'text' (or 'paragraph_text') "
                        "string") from None
