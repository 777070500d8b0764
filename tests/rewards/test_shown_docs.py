"""Issue 14 defect 2: step rewards score the passages as the policy saw them (cut by max_obs_length or by the
remaining budget), and the round records the cut."""
import pytest

from stepsearch.agent.observations import ObservationEncoder, hits_to_round
from stepsearch.rewards import RewardConfig, score_trajectory
from tests.rollout.models import tag_tokenizer

pytestmark = pytest.mark.timeout(60)

# Two gold passages with no common word of 2+ characters, so sim(A, B) = 0 and sim(X, X) = 1.
DOC_A = "Ottawa hosts Parliament Hill beside the Rideau canal."
DOC_B = "Kapuskasing lies north on Highway eleven near mills."
HITS = [{"document": {"id": "1", "title": "Ottawa", "text": DOC_A}, "score": 0.9},
        {"document": {"id": "2", "title": "Kapuskasing", "text": DOC_B}, "score": 0.8}]
TRUTH = {"target": ["x"], "search_keys": []}
CFG = RewardConfig(step_rewards_on_format_fail=True)


def _round_for_cap(cap: int) -> tuple[dict, bool]:
    enc = ObservationEncoder(tag_tokenizer())
    [block] = enc.information([HITS], caps=[cap], final_warning=[False])
    return hits_to_round("q", HITS, block.shown_chars), block.truncated


def _cap_showing_only_doc_a() -> int:
    """The largest cap whose kept body tokens end before DOC_B's text starts (found from the real tokenizer)."""
    tok = tag_tokenizer()
    enc = ObservationEncoder(tok)
    overhead = enc.information_overhead(final_warning=False)
    for cap in range(overhead + 200, overhead, -1):
        rnd, _ = _round_for_cap(cap)
        if rnd["hidden_docs"] == 1 and not rnd["docs"][0]["truncated"]:
            return cap
    raise AssertionError("no cap shows exactly the first doc")


def test_full_observation_scores_both_docs():
    rnd, truncated = _round_for_cap(10_000)
    assert not truncated and rnd["hidden_docs"] == 0 and [d["text"] for d in rnd["docs"]] == [DOC_A, DOC_B]
    s = score_trajectory("no answer", [rnd], TRUTH, [DOC_A, DOC_B], CFG)
    # c = [1, 1] -> G^1 = (1 + 1)/2 = 1; step = 0.6 · 1
    assert s.info_gain == pytest.approx([1.0], abs=1e-9) and s.step_rewards == pytest.approx([0.6], abs=1e-9)


def test_a_doc_cut_off_by_the_cap_earns_no_gain():
    rnd, truncated = _round_for_cap(_cap_showing_only_doc_a())
    assert truncated and rnd["hidden_docs"] == 1 and [d["text"] for d in rnd["docs"]] == [DOC_A]
    s = score_trajectory("no answer", [rnd], TRUTH, [DOC_A, DOC_B], CFG)
    # only A was shown: c = [sim(A, A) = 1, sim(A, B) = 0] -> G^1 = (1 + 0)/2 = 0.5; step = 0.6 · 0.5 = 0.3
    assert s.info_gain == pytest.approx([0.5], abs=1e-9) and s.step_rewards == pytest.approx([0.3], abs=1e-9)


def test_a_partly_shown_doc_keeps_its_shown_text():
    cap = _cap_showing_only_doc_a() + 3                 # three more body tokens reach into DOC_B's text
    rnd, _ = _round_for_cap(cap)
    shown_b = rnd["docs"][1]
    assert rnd["hidden_docs"] == 0 and shown_b["truncated"]
    assert DOC_B.startswith(shown_b["text"]) and 0 < len(shown_b["text"]) < len(DOC_B)
    tok = tag_tokenizer()
    [block] = ObservationEncoder(tok).information([HITS], caps=[cap], final_warning=[False])
    assert shown_b["text"] in tok.decode(block.token_ids)  # the recorded text is what the policy saw
