"""Information gain G^t: the memory-vector algorithm, and TF-IDF similarities equal to a sklearn refit (docs/method.md §1.6)."""
import random

import numpy as np
import pytest

from stepsearch.rewards.info_gain import GoldTfidf, info_gain, info_gain_from_similarities
from stepsearch.rewards.reference import reference_info_gain, sklearn_similarities

from .reward_cases import random_case, random_doc_text, wiki_passages

pytestmark = pytest.mark.timeout(120)


def test_worked_example_from_similarities():
    # docs/method.md §1.9. Rows = retrieved docs, columns = (g1, g2).
    round1 = np.array([[0.90, 0.05], [0.10, 0.30], [0.20, 0.10]])
    # c¹ = [0.90, 0.30]; gains [0.90, 0.30] → G¹ = 0.60; m = [0.90, 0.30]
    round2 = np.array([[0.95, 0.20], [0.10, 0.80], [0.90, 0.05]])
    # c² = [0.95, 0.80]; gains [0.05, 0.50] → G² = 0.275; m = [0.95, 0.80]
    gains = info_gain([round1, round2])
    assert gains == pytest.approx([0.60, 0.275], abs=1e-12)


def test_memory_gives_diminishing_returns():
    # the same coverage twice: the second round gains nothing; a worse round gains nothing either
    sims = [np.array([[0.5, 0.2]]), np.array([[0.5, 0.2]]), np.array([[0.1, 0.1]]), np.array([[0.7, 0.2]])]
    # G = [(0.5 + 0.2)/2, 0, 0, (0.7 − 0.5)/2]
    assert info_gain_from_similarities(sims) == pytest.approx([0.35, 0.0, 0.0, 0.1], abs=1e-12)
    # an empty round (no docs) gains nothing and leaves the memory as it is
    assert info_gain_from_similarities([np.zeros((0, 2)), np.array([[0.4, 0.0]])]) == pytest.approx([0.0, 0.2])


def test_no_gold_docs_gives_no_gains():
    assert info_gain([["some text"]], []) == []
    assert info_gain_from_similarities([np.zeros((3, 0))]) == []


def test_shape_error_names_the_round():
    with pytest.raises(ValueError, match=r"round_sims\[1\] must have shape \(k_t, 2\)"):
        info_gain_from_similarities([np.zeros((1, 2)), np.zeros((1, 3))])


def test_identical_doc_has_similarity_one_and_empty_doc_zero():
    golds = [p["text"] for p in wiki_passages()[:2]]
    sims = GoldTfidf(golds).similarities([golds[1], "", "!!! ..."])
    assert sims[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(sims[1:] == 0.0)


def test_similarities_equal_sklearn_refit_on_1000_random_cases():
    """1000 randomized (retrieved doc, gold set) pairs from real wiki-18 passages: every cosine within 1e-6 of a
    TfidfVectorizer refit on {doc} ∪ golds."""
    rng = random.Random(1234)
    worst = 0.0
    for _ in range(1000):
        golds = [p["text"] for p in rng.sample(wiki_passages(), rng.randint(1, 4))]
        doc = random_doc_text(rng, golds)
        ours = GoldTfidf(golds).similarities([doc])[0]
        ref = np.array(sklearn_similarities(doc, golds))
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst < 1e-6


def _trajectory_cases(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        yield random_case(rng)


def test_info_gain_equals_sklearn_reference_on_random_trajectories():
    """200 randomized trajectories (1–3 rounds × 1–3 docs, 1–4 golds): G^t within 1e-6 of the loop + sklearn."""
    for rounds, golds in _trajectory_cases(200, seed=7):
        assert info_gain(rounds, golds) == pytest.approx(reference_info_gain(rounds, golds), abs=1e-6)


@pytest.mark.slow
def test_info_gain_equals_sklearn_reference_on_1000_random_trajectories():
    for rounds, golds in _trajectory_cases(1000, seed=99):
        assert info_gain(rounds, golds) == pytest.approx(reference_info_gain(rounds, golds), abs=1e-6)


def test_vectorized_similarities_match_per_doc_loop():
    """The batched (m, n) product equals computing every doc on its own (the loop it replaces)."""
    rng = random.Random(5)
    rounds, golds = random_case(rng, max_rounds=5, max_docs=3)
    docs = [d for r in rounds for d in r]
    gold = GoldTfidf(golds)
    batched = gold.similarities(docs)
    looped = np.stack([gold.similarities([d])[0] for d in docs])
    assert np.abs(batched - looped).max() < 1e-12


def test_empty_gold_docs_match_sklearn():
    # gold vectors with no terms have zero norm → cosine 0, in sklearn and here
    golds = ["", "!!! the", wiki_passages()[3]["text"]]
    docs = ["hello world", wiki_passages()[3]["text"][:200]]
    ours = GoldTfidf(golds).similarities(docs)
    ref = np.array([sklearn_similarities(d, golds) for d in docs])
    assert np.abs(ours - ref).max() < 1e-12
    assert np.all(ours[:, :2] == 0.0) and ours[1, 2] > 0.5
