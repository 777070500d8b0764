"""Redundancy penalty P^t by document id, with the normalized title+text fallback (docs/method.md §1.7)."""
import pytest

from stepsearch.rewards.redundancy import doc_key, redundancy_penalty

pytestmark = pytest.mark.timeout(30)


def test_penalty_by_id_hand_computed():
    rounds = [["a", "b", "c"], ["c", "d", "e"], ["a", "c", "f"], ["g", "g", "h"]]
    # round 1: nothing seen → 0
    # round 2: "c" seen → 1/3
    # round 3: "a", "c" seen → 2/3
    # round 4: "g" new, then "g" again inside the round → 1/3 (within-round duplicates count, like the code)
    assert redundancy_penalty(rounds) == pytest.approx([0.0, 1 / 3, 2 / 3, 1 / 3], abs=1e-12)


def test_docs_compared_by_id_not_by_rank_or_text():
    d1 = {"id": "17", "title": "Paris", "text": "Paris is the capital."}
    same_id_other_text = {"id": "17", "title": "Paris", "text": "Paris is the capital. Doc 3"}
    other_id_same_text = {"id": "18", "title": "Paris", "text": "Paris is the capital."}
    assert redundancy_penalty([[d1], [same_id_other_text, other_id_same_text]]) == pytest.approx([0.0, 0.5])


def test_fallback_to_normalized_title_and_text_without_ids():
    a = {"id": None, "title": "The Paris", "text": "Paris is the capital."}
    b = {"title": "paris", "text": "PARIS is capital"}               # normalizes to the same key
    c = {"id": "", "title": "Paris", "text": "Lyon is a city."}
    assert doc_key(a) == doc_key(b) == ("text", "paris", "paris is capital")
    assert redundancy_penalty([[a], [b, c]]) == pytest.approx([0.0, 0.5])


def test_empty_round_and_bad_doc():
    assert redundancy_penalty([[], ["x"]]) == [0.0, 0.0]
    with pytest.raises(KeyError, match=r"rounds\[0\]\.docs\[1\] has no 'text'"):
        redundancy_penalty([[{"id": "1"}, {"title": "no body"}]])
