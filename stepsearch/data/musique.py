"""MuSiQue -> QAExample: (a) the released StepSearch JSONL, (b) original MuSiQue records (docs/method.md §4.1-4.3).

(b) builds what the paper's pipeline starts from: one search-key group per decomposition step (the
sub-question with every ``#k`` replaced by sub-answer k) and the supporting paragraphs as support docs.
Both keep the steps' answers (``QAExample.sub_answers`` -> ``ground_truth.sub_answers``): (b) from
``question_decomposition[].answer``, (a) from an optional ``sub_answers`` field (one str or list of str per hop).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from stepsearch.data.formats import QAExample, SupportDoc, dedup_keep_order
from stepsearch.data.io import DataError, Located, require

REF = re.compile(r"#(\d+)")


@dataclass
class ConvertStats:
    """Counts reported by the converters."""

    read: int = 0
    kept: int = 0
    skipped_unanswerable: int = 0


def detect_musique_kind(loc: Located) -> str:
    """'released' (StepSearch JSONL), 'original' (MuSiQue), or DataError naming the expected fields."""
    rec = loc.record
    if "question_decomposition" in rec:
        return "original"
    if "sub_searchs" in rec or "final_answer" in rec:
        return "released"
    raise DataError(f"{loc.where}: cannot tell the input format: expected either the released StepSearch fields "
                    "('question', 'final_answer', 'answer_aliases', 'sub_searchs', 'sub_support_docs') or original "
                    f"MuSiQue fields ('paragraphs', 'question_decomposition', 'answer'); got {sorted(rec)}")


def resolve_refs(sub_question: str, sub_answers: list[str], step: int, where: str) -> str:
    """Replace each ``#k`` in step `step` (0-based) with sub-answer k (1-based), e.g. "Who founded #1 ?"."""
    def sub(m: re.Match) -> str:
        k = int(m.group(1))
        if not 1 <= k <= step:
            raise DataError(f"{where}: question_decomposition[{step}].question {sub_question!r} refers to #{k}, "
                            f"but only steps #1..#{step} come before it")
        return sub_answers[k - 1]

    return " ".join(REF.sub(sub, sub_question).split())


def key_alternatives(resolved: str) -> tuple[str, ...]:
    """The search-key group of one step: the resolved sub-question, plus a plain form of MuSiQue's KB-style
    ``"Subject >> relation"`` questions ("Subject relation"), which reads like a search query."""
    alts = [resolved]
    if ">>" in resolved:
        alts.append(" ".join(resolved.replace(">>", " ").split()))
    return dedup_keep_order(a for a in alts if a)


def _answers(loc: Located, answer_field: str) -> tuple[str, ...]:
    answer = require(loc, answer_field, str, allow_empty=False)
    aliases = loc.record.get("answer_aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise DataError(f"{loc.where}: field 'answer_aliases' must be a list of str, got {aliases!r}")
    return dedup_keep_order([answer.strip()] + [a.strip() for a in aliases if a.strip()])


def _paragraph(loc: Located, p, i: int) -> tuple[int, SupportDoc, bool]:
    if not isinstance(p, dict):
        raise DataError(f"{loc.where}: paragraphs[{i}] must be an object, got {type(p).__name__}")
    for name, kind in (("title", str), ("paragraph_text", str)):
        if not isinstance(p.get(name), kind):
            raise DataError(f"{loc.where}: field 'paragraphs[{i}].{name}' must be {kind.__name__}, got {p.get(name)!r}")
    idx = p.get("idx", i)
    if not isinstance(idx, int):
        raise DataError(f"{loc.where}: field 'paragraphs[{i}].idx' must be int, got {idx!r}")
    return idx, SupportDoc(p["title"], p["paragraph_text"]), bool(p.get("is_supporting", False))


def from_original(loc: Located) -> QAExample | None:
    """Convert one original MuSiQue record; None if `answerable` is false (the caller counts these)."""
    rec = loc.record
    if rec.get("answerable", True) is False:
        return None
    rid = require(loc, "id", str, allow_empty=False)
    question = require(loc, "question", str, allow_empty=False)
    paragraphs = [_paragraph(loc, p, i) for i, p in enumerate(require(loc, "paragraphs", list))]
    steps = require(loc, "question_decomposition", list, allow_empty=False)
    by_idx = {idx: doc for idx, doc, _ in paragraphs}
    sub_answers, groups, docs = [], [], []
    for s, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("question"), str) or not isinstance(step.get("answer"), str):
            raise DataError(f"{loc.where}: field 'question_decomposition[{s}]' needs str 'question' and 'answer', got {step!r}")
        groups.append(key_alternatives(resolve_refs(step["question"], sub_answers, s, loc.where)))
        sub_answers.append(step["answer"].strip())
        sup = step.get("paragraph_support_idx")
        if sup is not None:
            if sup not in by_idx:
                raise DataError(f"{loc.where}: field 'question_decomposition[{s}].paragraph_support_idx' = {sup} "
                                f"names no paragraph (idx values: {sorted(by_idx)})")
            docs.append(by_idx[sup])
    # Supporting paragraphs in decomposition order first (one per step, so a paragraph that supports two steps
    # appears twice, like the released per-sub-question docs), then the other is_supporting ones in idx order.
    docs += [doc for _, doc, is_sup in sorted(paragraphs, key=lambda t: t[0]) if is_sup and doc not in docs]
    answers = _answers(loc, "answer")
    return QAExample(id=rid, question=question, answers=answers, search_keys=tuple(groups),
                     support_docs=tuple(docs), where=loc.where,
                     sub_answers=with_final_aliases(tuple((a,) if a else () for a in sub_answers), answers))


def with_final_aliases(hops: tuple[tuple[str, ...], ...], answers: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Per-step answers with the last step's widened to the question's answer and aliases when that step's one
    answer is the question's answer (the last step answers the question itself)."""
    hops = list(hops)
    if hops and answers and hops[-1] == (answers[0],):
        hops[-1] = answers
    return tuple(hops)


def _released_sub_answers(loc: Located) -> tuple[tuple[str, ...], ...]:
    """The optional 'sub_answers' field of a released record: per hop a str or a list of str (aliases)."""
    value = loc.record.get("sub_answers")
    if value is None:
        return ()
    hops = []
    if isinstance(value, list):
        for hop in value:
            if isinstance(hop, str):
                hops.append((hop.strip(),) if hop.strip() else ())
            elif isinstance(hop, list) and all(isinstance(a, str) for a in hop):
                hops.append(dedup_keep_order(a.strip() for a in hop if a.strip()))
            else:
                break
        else:
            return tuple(hops)
    raise DataError(f"{loc.where}: field 'sub_answers' must be a list with one str or list of str per hop, "
                    f"got {value!r:.120}")


def from_released(loc: Located, index: int, split: str, answer_field: str = "final_answer") -> QAExample:
    """Convert one line of the released StepSearch JSONL (`sub_searchs`, `sub_support_docs`, optional
    `sub_answers`)."""
    question = require(loc, "question", str, allow_empty=False)
    groups = loc.record.get("sub_searchs", [])
    if not isinstance(groups, list) or not all(
            isinstance(g, list) and all(isinstance(k, str) for k in g) for g in groups):
        raise DataError(f"{loc.where}: field 'sub_searchs' must be a list of lists of str, got {groups!r:.120}")
    docs = []
    for i, d in enumerate(loc.record.get("sub_support_docs", []) or []):
        if isinstance(d, str):
            docs.append(SupportDoc("", d))
        elif isinstance(d, dict) and isinstance(d.get("paragraph_text", d.get("text")), str):
            docs.append(SupportDoc(str(d.get("title") or ""), d.get("paragraph_text", d.get("text"))))
        else:
            raise DataError(f"{loc.where}: field 'sub_support_docs[{i}]' needs 'title' and 'paragraph_text', got {d!r:.120}")
    rid = loc.record.get("id")
    rid = rid if isinstance(rid, str) and rid else f"musi_{split}_{index}"
    return QAExample(id=rid, question=question, answers=_answers(loc, answer_field),
                     search_keys=tuple(tuple(k.strip() for k in g if k.strip()) for g in groups),
                     support_docs=tuple(docs), where=loc.where,  # duplicates kept: they are n in G^t (released)
                     sub_answers=_released_sub_answers(loc))


def convert_musique(locs, split: str, answer_field: str = "final_answer") -> tuple[list[QAExample], ConvertStats]:
    """Convert records of either kind (detected per record). Unanswerable originals are skipped and counted."""
    stats, out = ConvertStats(), []
    for loc in locs:
        stats.read += 1
        if detect_musique_kind(loc) == "original":
            ex = from_original(loc)
            if ex is None:
                stats.skipped_unanswerable += 1
                continue
        else:
            ex = from_released(loc, stats.read - 1, split, answer_field)
        out.append(ex)
    stats.kept = len(out)
    return out, stats
