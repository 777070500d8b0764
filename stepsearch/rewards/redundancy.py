"""Redundancy penalty P^t (docs/method.md §1.7; arXiv 2505.15107, the redundancy penalty of the step reward).

    P^t = (1/k) Σ_j 1(d_j^{r(t)} ∈ H^{t−1}),   H^t = H^{t−1} ∪ I^t,   H^0 = ∅

Docs are compared by document id (the paper's intent), or, when a doc has no id, by its normalized title + body
(never by the released code's rank-labelled strings). As in the released code, a doc repeated inside one round is
penalized too: docs enter the history one by one, in rank order.
"""
from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

from .docs import doc_title_text
from .qa import normalize_answer

__all__ = ["doc_key", "redundancy_penalty"]


def doc_key(doc: Any, where: str = "doc") -> Hashable:
    """Identity of a retrieved doc: ``("id", id)`` when it has a non-empty id, else ``("text", title, body)``
    normalized. A non-dict value (e.g. an id string in tests) is its own key."""
    if not isinstance(doc, Mapping):
        return doc
    doc_id = doc.get("id")
    if doc_id is not None and str(doc_id) != "":
        return ("id", str(doc_id))
    title, text = doc_title_text(doc, where)
    return ("text", normalize_answer(title), normalize_answer(text))


def redundancy_penalty(rounds: Sequence[Sequence[Any]]) -> list[float]:
    """P^t per round. ``rounds[t]``: the docs of round t (dicts with ``id`` or ``title``/``text``, or plain
    hashable keys). An empty round has P^t = 0."""
    history: set[Hashable] = set()                                          # H
    penalties = []
    for t, docs in enumerate(rounds):
        repeated = 0
        for j, doc in enumerate(docs):
            key = doc_key(doc, f"rounds[{t}].docs[{j}]")
            if key in history:
                repeated += 1                                               # 1(d_j ∈ H), within-round repeats too
            else:
                history.add(key)
        penalties.append(repeated / len(docs) if docs else 0.0)            # (1/k) Σ_j
    return penalties
