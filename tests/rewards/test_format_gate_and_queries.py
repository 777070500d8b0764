"""Issue 14 defects 3, 4 and 6 (reward side): the paper's format check and gate, queries from the policy's own
search rounds only, and the "ow sub-answer" reward. Every expected number is worked out in the comments."""
import pytest
import torch

from stepsearch.agent.tags import FINAL_TURN_WARNING, INVALID_ACTION_WARNING
from stepsearch.rewards import RewardConfig, compute_token_rewards, score_trajectory
from stepsearch.rewards.qa import check_format, check_format_paper
from stepsearch.rewards.docs import policy_text
from verl.protocol import DataProto

pytestmark = pytest.mark.timeout(30)

GOLD_DOC = "Paris is the capital and largest city of France."
TRUTH = {"target": ["Paris"], "search_keys": [["capital of france"], ["eiffel tower city"]]}
# One search round whose only doc is the gold passage itself: sim = 1, so G^1 = 1 and P^1 = 0.
ROUNDS = [{"query": "capital of france", "docs": [{"id": "7", "title": "Paris", "text": GOLD_DOC}]}]
SEARCH = "<think>plan</think><search>capital of france</search>\n\n<information> Doc 1<## Title: Paris ##> " \
         + GOLD_DOC + " </information>\n\n"


# ---- defect 3: the paper's format check -------------------------------------------------------------------------
@pytest.mark.parametrize("text, released, paper", [
    # think+search round, one answer at the end: both pass
    (SEARCH + "<think>found</think><answer>Paris</answer>", True, True),
    # no search round: the released check passes, the paper's needs >= 1 think+search round
    ("<think>I know it</think><answer>Paris</answer>", True, False),
    # two answers: released uses the last one; the paper needs exactly one
    (SEARCH + "<answer>Lyon</answer><think>no</think><answer>Paris</answer>", True, False),
    # a search without a <think> before it is not the paper's think+search round
    ("<search>capital of france</search>\n\n<information> x </information>\n\n<answer>Paris</answer>", True, False),
    # text after the answer fails both
    (SEARCH + "<answer>Paris</answer> and more", False, False),
    # the invalid-action warning quotes "<answer> and </answer>": injected text, not a second answer
    ("<think>hm</think>oops" + INVALID_ACTION_WARNING + SEARCH + "<answer>Paris</answer>", True, True),
])
def test_released_and_paper_format_checks(text, released, paper):
    assert check_format(text) is released
    assert check_format_paper(policy_text(text)) is paper


# ---- defect 3: the paper's gate zeroes r_answer only -------------------------------------------------------------
NO_ANSWER = SEARCH + "<think>still unsure</think>" + FINAL_TURN_WARNING + "<think>out of turns"


def test_released_gate_scores_minus_one_and_drops_steps():
    s = score_trajectory(NO_ANSWER, ROUNDS, TRUTH, [GOLD_DOC], RewardConfig())
    # r_key = (F1 1 for group 1 + 0 for group 2) / 2 = 0.5 is logged but not paid
    assert (s.format_ok, s.key_reward, s.overall, s.step_rewards) == (False, 0.5, -1.0, [])
    assert s.info_gain == pytest.approx([1.0])


def test_paper_gate_keeps_gamma_key_times_r_key_and_the_steps():
    s = score_trajectory(NO_ANSWER, ROUNDS, TRUTH, [GOLD_DOC], RewardConfig(format_gate="paper"))
    # r_answer = 0 (format failure), overall = 0 + 0.618 · 0.5 = 0.309; step = 0.6 · (G 1 − P 0) = 0.6
    assert s.overall == pytest.approx(0.309, abs=1e-12)
    assert s.step_rewards == pytest.approx([0.6], abs=1e-9)


def test_paper_check_and_gate_on_an_answer_without_search():
    text = "<think>I know it</think><answer>Paris</answer>"
    cfg = RewardConfig(format_check="paper", format_gate="paper")
    s = score_trajectory(text, [], TRUTH, [GOLD_DOC], cfg)
    # F1 = 1 is logged, but no think+search round: r_answer = 0, r_key = 0 (no query) -> overall 0
    assert (s.answer_f1, s.format_ok, s.overall) == (1.0, False, 0.0)
    # the released check accepts it: overall = F1 1 + 0.618 · 0 = 1
    assert score_trajectory(text, [], TRUTH, [GOLD_DOC], RewardConfig()).overall == 1.0


# ---- defect 4: queries only from the policy's own search rounds -------------------------------------------------
def test_a_warning_quoting_search_tags_is_not_a_query():
    # the policy never searched; the invalid-action warning contains "<search> and </search>"
    text = "<think>hm</think>let me look" + INVALID_ACTION_WARNING + "<think>ok</think><answer>Paris</answer>"
    truth = {"target": ["Paris"], "search_keys": [["rock and roll"]]}
    # had "and" counted: F1("and", "rock and roll") = 2·1·(1/3)/(1 + 1/3) = 0.5 -> overall 1.309
    for rounds in ([], None):                        # recorded by the rollout, or parsed from the text
        s = score_trajectory(text, rounds, truth, [], RewardConfig())
        assert (s.key_reward, s.overall) == (0.0, 1.0)


def test_key_reward_uses_the_recorded_round_queries():
    # compute_token_rewards (the trainer path) reads the queries the rollout recorded per round, here both groups'
    # keys (r_key = (1 + 1)/2 = 1), not the response text (whose one <search> span would give (1 + 0)/2 = 0.5)
    data = DataProto.from_dict(tensors={"response_mask": torch.tensor([[1, 1, 0, 1]])}, non_tensors={
        "response_text": ["<think>q</think><search>capital of france</search><information>x</information>"
                          "<answer>Paris</answer>"],
        "rounds": [[{"query": "capital of france", "docs": []}, {"query": "eiffel tower city", "docs": []}]],
        "search_end_positions": [[0, 1]], "ground_truth": [TRUTH], "support_docs": [[]]})
    _, _, (score,) = compute_token_rewards(data, RewardConfig())
    assert score.key_reward == 1.0


# ---- defect 6: the "ow sub-answer" row ---------------------------------------------------------------------------
def test_ow_sub_answer_scores_the_sub_answer_tags():
    text = ("<sub_question_1>Who directed Titanic?</sub_question_1><sub_answer_1>James Cameron</sub_answer_1>"
            "<sub_question_2>Where was he born?</sub_question_2><sub_answer_2>Canada</sub_answer_2>"
            "<answer>Kapuskasing</answer>")
    truth = {"target": ["Kapuskasing"], "search_keys": [["titanic director"]],
             "sub_answers": ["James Cameron", "Kapuskasing"]}
    s = score_trajectory(text, [], truth, [], RewardConfig.for_ablation("ow_sub_answer"))
    # r_sub = (max_k F1(a_k, "James Cameron") = 1 + max_k F1(a_k, "Kapuskasing") = 0) / 2 = 0.5
    # overall = F1 1 + 0.618 · 0.5 = 1.309 (no r_key in this row)
    assert s.sub_answer_reward == 0.5 and s.overall == pytest.approx(1.309, abs=1e-12)
    # the full StePPO row does not pay r_sub
    assert score_trajectory(text, [], truth, [], RewardConfig()).overall == 1.0
