"""Scoring of evaluation predictions and their aggregation per data_source (docs/method.md §6.1).

A *raw* prediction is what a rollout produced for one question (id, data_source, question, trajectory text,
the trajectory `record` (stepsearch.agent.record), rounds with queries and docs, counters, targets, gold docs).
`score_prediction` adds EM / F1 (the record's, computed once by the rollout) and cover-EM of its prediction, the
format gate, per-round G^t / P^t / step reward from `stepsearch.rewards`, and support-doc recall. Scoring only
reads the raw fields, so `--from-predictions` re-scores a file without generating. A prediction without a record
(files of older runs) is scored from its text and rounds.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence

from stepsearch.agent.record import TrajectoryRecord
from stepsearch.rewards import RewardConfig, TrajectoryScore, cover_exact_match, score_record, score_trajectory
from stepsearch.rewards.docs import support_doc_title_text
from stepsearch.rewards.redundancy import doc_key

RAW_FIELDS = ("id", "data_source", "question", "trajectory", "targets", "rounds", "num_turns", "num_searches",
              "num_tokens")
SUMMARY_KEYS = ("em", "f1", "cover_em", "format_ok", "num_searches", "num_turns", "num_tokens", "support_recall")


def _doc_keys(doc: Any) -> set:
    """Every key a document can be matched by (`stepsearch.rewards.redundancy.doc_key` of its id, when it has one,
    and of its normalized title + text), so an id-less gold doc still matches a corpus row."""
    title, text = support_doc_title_text(doc, "document")
    keys = {doc_key({"title": title, "text": text})}
    if isinstance(doc, Mapping) and doc.get("id") not in (None, ""):
        keys.add(doc_key(doc))
    return keys


def support_recall(rounds: Sequence[Mapping], support_docs: Sequence[Any]) -> float | None:
    """Share of gold docs retrieved in any round; None when the question has no gold docs."""
    if not support_docs:
        return None
    retrieved = set().union(*[_doc_keys(d) for r in rounds for d in r.get("docs", [])]) if rounds else set()
    hits = sum(1 for g in support_docs if _doc_keys(g) & retrieved)
    return hits / len(support_docs)


def check_raw(pred: Mapping, where: str) -> None:
    missing = [k for k in RAW_FIELDS if k not in pred]
    if missing:
        raise KeyError(f"{where}: prediction lacks fields {missing}; a prediction needs {list(RAW_FIELDS)}")
    if not isinstance(pred["rounds"], list):
        raise TypeError(f"{where}: field 'rounds' must be a list of {{query, docs}}, got {type(pred['rounds']).__name__}")


def score_prediction(pred: Mapping, reward_cfg: RewardConfig, where: str = "prediction",
                     score: TrajectoryScore | None = None) -> dict:
    """A new dict: the raw fields plus answer, em, f1, cover_em, format_ok, overall, support_recall and, per
    round, doc_ids, gold_hits, info_gain (G^t), redundancy (P^t) and step_reward. ``score``: the trajectory's
    TrajectoryScore when the caller already has it (the trainer's reward hook), so nothing is scored twice."""
    check_raw(pred, where)
    support_docs = list(pred.get("support_docs") or [])
    ground_truth = {"target": list(pred["targets"]), "search_keys": list(pred.get("search_keys") or []),
                    "sub_answers": list(pred.get("sub_answers") or [])}
    record = TrajectoryRecord.from_dict(pred["record"], f"{where}: field 'record'") if pred.get("record") else None
    source_rounds = record.rounds() if record is not None else pred["rounds"]
    if score is None:
        score = (score_record(record, pred["trajectory"], ground_truth, support_docs, reward_cfg) if record is not None
                 else score_trajectory(pred["trajectory"], source_rounds, ground_truth, support_docs, reward_cfg))
    answer = "" if score.answer is None else score.answer
    gold_keys = set().union(*[_doc_keys(g) for g in support_docs]) if support_docs else set()
    rounds = []
    for t, rnd in enumerate(source_rounds):
        docs = list(rnd.get("docs", []))
        rounds.append({
            "query": rnd.get("query", ""), "docs": docs, "doc_ids": [d.get("id") for d in docs],
            "gold_hits": [bool(_doc_keys(d) & gold_keys) for d in docs],
            "info_gain": score.info_gain[t] if t < len(score.info_gain) else None,
            "redundancy": score.redundancy[t] if t < len(score.redundancy) else None,
            "step_reward": score.step_rewards[t] if t < len(score.step_rewards) else None,
        })
    return {**pred, "rounds": rounds, "answer": answer, "em": score.answer_em, "f1": score.answer_f1,
            "cover_em": cover_exact_match(answer, pred["targets"]), "format_ok": bool(score.format_ok),
            "overall": score.overall, "key_reward": score.key_reward,
            "support_recall": support_recall(source_rounds, support_docs)}


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def retrieval_failed(pred: Mapping) -> bool:
    """Whether a prediction's rollout had a retrieval that failed after the client's retries (its
    ``retrieval_errors`` is non-empty; predictions written before that field existed count as not failed)."""
    return bool(pred.get("retrieval_errors"))


def aggregate(preds: Sequence[Mapping]) -> "OrderedDict[str, dict]":
    """Per data_source (sorted) and "all": n, the mean of every SUMMARY_KEYS field (None when undefined), and
    ``retrieval_failures``, the number of predictions whose rollout had a failed retrieval."""
    groups: dict[str, list[Mapping]] = {}
    for p in preds:
        groups.setdefault(p["data_source"], []).append(p)
    out: OrderedDict[str, dict] = OrderedDict()
    for name in sorted(groups) + ["all"]:
        rows = list(preds) if name == "all" else groups[name]
        out[name] = {"n": len(rows), **{k: _mean([r.get(k) for r in rows]) for k in SUMMARY_KEYS},
                     "retrieval_failures": sum(retrieval_failed(r) for r in rows)}
    return out


def markdown_table(per_source: Mapping[str, Mapping]) -> str:
    """The summary as a markdown table (one row per data_source, then "all")."""
    head = ("| data_source | n | EM | F1 | cover-EM | format ok | searches | turns | tokens | support recall | "
            "retrieval failures |\n|---|---|---|---|---|---|---|---|---|---|---|\n")

    def cell(v, fmt="{:.3f}"):
        return "–" if v is None else fmt.format(v)

    lines = [f"| {name} | {m['n']} | {cell(m['em'])} | {cell(m['f1'])} | {cell(m['cover_em'])} | "
             f"{cell(m['format_ok'])} | {cell(m['num_searches'], '{:.2f}')} | {cell(m['num_turns'], '{:.2f}')} | "
             f"{cell(m['num_tokens'], '{:.1f}')} | {cell(m['support_recall'])} | {m['retrieval_failures']} |"
             for name, m in per_source.items()]
    return head + "\n".join(lines) + "\n"
