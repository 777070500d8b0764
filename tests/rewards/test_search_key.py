"""Search-key reward r_key, both modes (docs/method.md §1.4)."""
import pytest

from stepsearch.rewards.search_key import key_reward_latest, key_reward_max, search_key_reward

pytestmark = pytest.mark.timeout(30)

GROUPS = [["capital of france", "france capital"], ["paris population"]]


def test_max_mode_paper_formula():
    # q1 "capital of france": group0 F1 = 1.0 (exact), group1 "paris population" → no overlap → 0
    # q2 "paris population": group1 → overlap 2, F1 = 1.0
    # r_key = (1.0 + 1.0) / 2 = 1.0
    assert key_reward_max(["capital of france", "paris population"], GROUPS) == 1.0
    # only q "france": group0 alt0 "capital of france": P = 1, R = 1/3 → F1 = 0.5;
    # alt1 "france capital": P = 1, R = 1/2 → F1 = 2/3 → 0.6667; max = 0.6667
    # r_key = (0.6667 + 0) / 2 = 0.33335
    assert key_reward_max(["france"], GROUPS) == pytest.approx(0.33335, abs=1e-12)


def test_latest_mode_overwrites_with_worse_query():
    # q1 "capital of france" → group0 score 1.0
    # q2 "france" → best group0 with 0.6667 → OVERWRITES 1.0 → score [0.6667, 0]
    # r_key = 0.6667 / 2 = 0.33335, while max mode keeps 1.0 → 0.5
    queries = ["capital of france", "france"]
    assert key_reward_latest(queries, GROUPS) == pytest.approx(0.33335, abs=1e-12)
    assert key_reward_max(queries, GROUPS) == pytest.approx(0.5, abs=1e-12)


def test_latest_mode_ties_go_to_lowest_index_and_zero_is_ignored():
    groups = [["alpha beta"], ["alpha gamma"]]
    # "alpha": F1 with either = 2·1·0.5/1.5 = 0.6667 → tie → group 0 only; r_key = 0.6667/2
    assert key_reward_latest(["alpha"], groups) == pytest.approx(0.6667 / 2, abs=1e-12)
    # a query matching nothing leaves the scores untouched
    assert key_reward_latest(["alpha", "zzz"], groups) == pytest.approx(0.6667 / 2, abs=1e-12)


def test_empty_inputs_and_dispatch():
    assert search_key_reward([], GROUPS) == 0.0
    assert search_key_reward(["x"], []) == 0.0
    assert search_key_reward(["x"], None) == 0.0
    with pytest.raises(ValueError, match="key_reward_mode 'best'.*valid modes"):
        search_key_reward(["x"], GROUPS, mode="best")
    with pytest.raises(TypeError, match="search_keys"):
        search_key_reward(["x"], "capital of france")
