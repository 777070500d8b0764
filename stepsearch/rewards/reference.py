"""Slow reference implementations, used as oracles by tests/rewards and bench/rewards.py (never in training).

They follow docs/method.md §1.6–1.8 literally: a scikit-learn ``TfidfVectorizer`` refit for every retrieved doc on
{doc} ∪ gold docs, plain Python loops for G^t, P^t and the token placement.
"""
from __future__ import annotations

import torch

from .reward_config import RewardConfig
from .docs import policy_text
from .qa import check_format, check_format_paper, exact_match, extract_answer, f1_score, normalize_answer
from .trajectory_score import gold_texts, round_doc_texts
from .search_key import search_key_reward

__all__ = ["sklearn_similarities", "reference_info_gain", "reference_redundancy", "reference_token_scores"]


def sklearn_similarities(doc_text: str, golds: list[str]) -> list[float]:
    """sim(x, g_i) for every gold doc: TfidfVectorizer() refit on [normalized x] + [normalized golds], cosine, ≥ 0.

    TfidfVectorizer rows are L2-normalized, so the cosine is the plain dot product of rows (0 for a zero row);
    this is what sklearn's ``cosine_similarity`` returns, without its input-validation overhead.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer()
    x = normalize_answer(doc_text)
    if not vectorizer.build_analyzer()(x):
        return [0.0] * len(golds)                                   # an empty x gives all zeros
    matrix = vectorizer.fit_transform([x] + [normalize_answer(g) for g in golds])
    cosines = (matrix[0] @ matrix[1:].T).toarray()[0]
    return [max(float(s), 0.0) for s in cosines]


def reference_info_gain(rounds_texts: list[list[str]], golds: list[str]) -> list[float]:
    """G^t with the memory vector, one sklearn refit per retrieved doc (docs/method.md §1.6 algorithm, as loops)."""
    n = len(golds)
    if n == 0:
        return []
    memory = [0.0] * n
    gains = []
    for docs in rounds_texts:
        coverage = [0.0] * n
        for doc in docs:
            sims = sklearn_similarities(doc, golds)
            coverage = [max(c, s) for c, s in zip(coverage, sims)]
        gains.append(sum(max(c - m, 0.0) for c, m in zip(coverage, memory)) / n)
        memory = [max(m, c) for m, c in zip(memory, coverage)]
    return gains


def reference_redundancy(rounds_docs: list[list[dict]]) -> list[float]:
    """P^t by id, else by normalized (title, text): fraction of a round's docs seen before (within-round too)."""
    seen, out = set(), []
    for docs in rounds_docs:
        penalty = 0.0
        for d in docs:
            has_id = d.get("id") not in (None, "")
            key = d["id"] if has_id else (normalize_answer(d["title"]), normalize_answer(d["text"]))
            if key in seen:
                penalty += 1 / len(docs)
            else:
                seen.add(key)
        out.append(penalty)
    return out


def reference_token_scores(response_mask: torch.Tensor, response_texts: list[str], rounds: list[list[dict]],
                           positions: list[list[int]], ground_truths: list[dict], support_docs: list[list],
                           cfg: RewardConfig) -> torch.Tensor:
    """Token-level scores (B, T) float32 computed with the slow pieces above and a per-token placement loop."""
    B, T = response_mask.shape
    out = torch.zeros((B, T), dtype=torch.float32)
    for b in range(B):
        text, gt = response_texts[b], ground_truths[b]
        answer = extract_answer(text)
        r_answer = (f1_score(answer, gt["target"]) if cfg.answer_metric == "f1" else exact_match(answer, gt["target"]))
        golds = gold_texts(support_docs[b])
        steps = []
        if golds and cfg.use_step_rewards:
            gains = reference_info_gain(round_doc_texts(rounds[b]), golds)
            pens = reference_redundancy([r["docs"] for r in rounds[b]])
            steps = [cfg.step_reward_scale
                     * ((g if cfg.use_info_gain else 0) - (p if cfg.use_redundancy_penalty else 0))
                     for g, p in zip(gains, pens)]
        ok = check_format(text) if cfg.format_check == "released" else check_format_paper(policy_text(text))
        key = search_key_reward([r["query"] for r in rounds[b]], gt.get("search_keys"), cfg.key_reward_mode)
        bonus = cfg.search_key_coef * key if cfg.use_search_key_reward else 0.0
        if ok:
            overall = r_answer + bonus
        elif cfg.format_gate == "paper":
            overall = bonus
        else:
            overall, steps = cfg.format_fail_score, (steps if cfg.step_rewards_on_format_fail else [])
        for step, pos in zip(steps, positions[b]):
            out[b, pos] = step
        last = max((t for t in range(T) if response_mask[b, t] == 1), default=None)
        if last is not None:
            out[b, last] = overall
    return out
