"""Information gain G^t (docs/method.md §1.6; arXiv 2505.15107 eqs. 7–11).

    c_i^t = max_j sim(d_j^{r(t)}, d_i^g)
    G^t   = (1/n) Σ_i max(c_i^t − m_i, 0)
    m_i  ← max(m_i, c_i^t)                     (m_i = 0 before round 1)

sim is the cosine of TF-IDF vectors that scikit-learn's ``TfidfVectorizer()`` (defaults: lower-case, tokens of 2+
word characters, smooth idf, raw tf, l2 norm) would give when refit on {x} ∪ {gold docs} for every retrieved doc x,
all texts normalized as answers first (§1.3). :class:`GoldTfidf` reproduces those numbers without refitting: the gold
docs are tokenized and counted once per example, and each retrieved doc x only changes the document frequency of
the terms it contains (by +1), so every (doc, gold) cosine follows from three small matrix products.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from operator import mul
from typing import Sequence

import numpy as np

from .qa import PUNCT_RE

__all__ = ["term_counts", "tfidf_terms", "clear_term_cache", "GoldTfidf", "info_gain_from_similarities", "info_gain"]

# sklearn's default token_pattern is (?u)\b\w\w+\b. With findall, \w{2,} finds the same tokens (each match is
# a maximal run of 2+ word characters either way) and runs faster.
_TOKEN_RE = re.compile(r"\w{2,}")
# Retrieved passages repeat a lot (a GRPO group shares its question; popular passages come back across questions).
_TERM_CACHE_SIZE = 4096


_ARTICLE_TERMS = ("an", "the")          # "a" is never a term (1 character)


def term_counts(text: str) -> Counter:
    """Term frequencies of ``TfidfVectorizer`` on ``normalize_answer(text)``, without building the normalized text.

    normalize_answer lower-cases, drops ASCII punctuation, removes the whole words a/an/the and collapses spaces.
    A whole word there is a maximal run of word characters, which is exactly one token of the 2+-character token
    pattern, so removing the articles equals dropping the terms "an"/"the"; whitespace never reaches a token.
    """
    counts = Counter(_TOKEN_RE.findall(PUNCT_RE.sub("", text.lower())))
    for article in _ARTICLE_TERMS:
        counts.pop(article, None)
    return counts


_cached_term_counts = lru_cache(maxsize=_TERM_CACHE_SIZE)(term_counts)


def clear_term_cache() -> None:
    """Empty the LRU cache of retrieved-doc term counts (benchmarks time a cold cache)."""
    _cached_term_counts.cache_clear()


def tfidf_terms(text: str) -> list[str]:
    """Terms of one text as the vectorizer sees it (order kept): normalized, lower-cased, 2+ word characters."""
    return [t for t in _TOKEN_RE.findall(PUNCT_RE.sub("", text.lower())) if t not in _ARTICLE_TERMS]


class GoldTfidf:
    """Per-example cache of the gold docs' term counts and document frequencies.

    With n_g gold docs the refit corpus has N = n_g + 1 documents, and for a term t
        idf(t) = ln((1 + N) / (1 + df(t))) + 1,   df(t) = df_gold(t) + [t ∈ x].
    Writing w0 = idf² with df = df_gold and w1 = idf² with df = df_gold + 1, for a retrieved doc x with counts x_t:
        x·g_i   = Σ_{t∈x} x_t g_it w1(t)                       (only shared terms, all of them in x)
        ‖x‖²    = Σ_{t∈x∩V_g} x_t² w1(t) + Σ_{t∈x∖V_g} x_t² idf_oov²   (df = 1 for terms no gold doc has)
        ‖g_i‖²  = Σ_t g_it² w0(t) + Σ_{t∈x} g_it² (w1(t) − w0(t))
    """

    def __init__(self, gold_texts: Sequence[str]):
        self.num_gold = len(gold_texts)
        gold_counts = [_cached_term_counts(g) for g in gold_texts]
        self.vocab: dict[str, int] = {}
        for counts in gold_counts:
            for term in counts:
                self.vocab.setdefault(term, len(self.vocab))
        self.counts = np.zeros((self.num_gold, len(self.vocab)))          # (n, V) raw term frequencies
        for i, counts in enumerate(gold_counts):
            for term, c in counts.items():
                self.counts[i, self.vocab[term]] = c
        df_gold = (self.counts > 0).sum(axis=0)                            # (V,)
        n_docs = self.num_gold + 1                                         # N: {x} ∪ gold
        self.w0 = (np.log((1 + n_docs) / (1 + df_gold)) + 1) ** 2          # (V,) idf² when x lacks the term
        self.w1 = (np.log((1 + n_docs) / (2 + df_gold)) + 1) ** 2          # (V,) idf² when x has the term
        self.w_oov = (np.log((1 + n_docs) / 2) + 1) ** 2                   # idf² of a term only x has
        self.counts_sq = self.counts ** 2
        self.base_norm_sq = self.counts_sq @ self.w0                       # (n,)

    def _doc_matrix(self, doc_texts: Sequence[str], use_cache: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(X (m, V) counts on the gold vocabulary, oov_sq (m,) Σ x_t² over other terms, has_terms (m,) bool)."""
        count_terms = _cached_term_counts if use_cache else term_counts
        X = np.zeros((len(doc_texts), len(self.vocab)))
        oov_sq = np.zeros(len(doc_texts))
        has_terms = np.zeros(len(doc_texts), dtype=bool)
        vocab = self.vocab
        rows, cols, vals = [], [], []
        for r, text in enumerate(doc_texts):
            counts = count_terms(text)                                     # read-only (may be cached)
            has_terms[r] = bool(counts)
            shared_sq = 0
            for term in counts.keys() & vocab.keys():                       # usually a handful of terms
                c = counts[term]
                rows.append(r), cols.append(vocab[term]), vals.append(c)
                shared_sq += c * c
            values = counts.values()
            oov_sq[r] = sum(map(mul, values, values)) - shared_sq
        X[rows, cols] = vals                                               # one scatter instead of per-term writes
        return X, oov_sq, has_terms

    def similarities(self, doc_texts: Sequence[str], use_cache: bool = True) -> np.ndarray:
        """Cosine similarities (m, n) of m retrieved docs with the n gold docs; 0 where either vector is zero.
        ``use_cache`` reuses the term counts of docs seen recently (an LRU of 4096 texts)."""
        m = len(doc_texts)
        if m == 0 or self.num_gold == 0:
            return np.zeros((m, self.num_gold))
        X, oov_sq, has_terms = self._doc_matrix(doc_texts, use_cache)
        dot = (X * self.w1) @ self.counts.T                                # (m, n)
        doc_norm_sq = (X ** 2) @ self.w1 + oov_sq * self.w_oov             # (m,)
        present = (X > 0).astype(float)
        gold_norm_sq = self.base_norm_sq + (present * (self.w1 - self.w0)) @ self.counts_sq.T  # (m, n)
        denom = np.sqrt(doc_norm_sq[:, None] * gold_norm_sq)
        sims = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 0)
        sims[~has_terms] = 0.0                                             # an empty x gives all zeros (§1.6)
        return np.maximum(sims, 0.0)


def info_gain_from_similarities(round_sims: Sequence[np.ndarray]) -> list[float]:
    """G^t for every round from precomputed similarities.

    round_sims[t]: (k_t, n) array, entry [j, i] = sim(d_j^{r(t)}, d_i^g). Returns [] when n = 0 (no gold docs).
    A round with no docs gains nothing (c^t = 0).
    """
    if not round_sims:
        return []
    n = np.asarray(round_sims[0]).shape[-1]
    if n == 0:
        return []
    memory = np.zeros(n)                                                    # m_i
    gains = []
    for t, sims in enumerate(round_sims):
        sims = np.asarray(sims, dtype=float)
        if sims.ndim != 2 or sims.shape[1] != n:
            raise ValueError(f"round_sims[{t}] must have shape (k_t, {n}), got {sims.shape}")
        coverage = sims.max(axis=0) if sims.shape[0] else np.zeros(n)      # c_i^t
        gains.append(float(np.maximum(coverage - memory, 0.0).sum()) / n)  # G^t = (1/n) Σ_i max(c_i^t − m_i, 0)
        memory = np.maximum(memory, coverage)                              # m_i ← max(m_i, c_i^t)
    return gains


def info_gain(rounds, gold_texts: Sequence[str] | GoldTfidf | None = None) -> list[float]:
    """G^t per round, from texts or from precomputed similarities.

    ``rounds``: either a list of (k_t, n) similarity arrays (``gold_texts`` unused), or a list of rounds, each a list
    of retrieved body texts, with ``gold_texts`` the gold body texts (or a prebuilt :class:`GoldTfidf`).
    """
    if all(isinstance(r, np.ndarray) for r in rounds) and rounds:
        return info_gain_from_similarities(rounds)
    if gold_texts is None:
        raise ValueError("info_gain: give gold_texts when rounds are texts (or pass (k_t, n) similarity arrays)")
    gold = gold_texts if isinstance(gold_texts, GoldTfidf) else GoldTfidf(list(gold_texts))
    if gold.num_gold == 0:
        return []
    flat = [text for round_texts in rounds for text in round_texts]
    sims = gold.similarities(flat)                                         # one product for all rounds
    bounds = np.cumsum([0] + [len(r) for r in rounds])
    return info_gain_from_similarities([sims[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
