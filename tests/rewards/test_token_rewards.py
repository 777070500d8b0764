"""Token placement and compute_token_rewards on a DataProto (docs/method.md §1.5, §1.8, §1.9, §1.11)."""
import random
import zlib

import numpy as np
import pytest
import torch

from stepsearch.rewards import RewardConfig, compute_token_rewards, format_docs, score_trajectory
from stepsearch.rewards.info_gain import info_gain
from stepsearch.rewards.redundancy import redundancy_penalty
from stepsearch.rewards.reference import reference_token_scores
from stepsearch.rewards.trajectory_score import combine_step_rewards
from stepsearch.rewards.token_rewards import place_token_rewards, trajectory_scalar_rewards
from verl.protocol import DataProto

from .reward_cases import random_case, wiki_passages

pytestmark = pytest.mark.timeout(60)

# A 14-token response: turn 1 generated tokens 0..2 (2 = its </search>), observation 3..5, turn 2 generated 6
# (its </search>), observation 7..9, final turn 10..11 (11 = the last token of </answer>), pad 12..13.
MASK = torch.tensor([[1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0]])
POSITIONS = [[2, 6]]


def test_worked_example_spec_1_9():
    cfg = RewardConfig()
    # Round similarities (rows: retrieved docs, columns: g1, g2) and doc ids; doc "b" repeats in round 2.
    sims = [np.array([[0.90, 0.05], [0.10, 0.30], [0.20, 0.10]]),
            np.array([[0.95, 0.20], [0.10, 0.80], [0.90, 0.05]])]
    ids = [["a", "b", "c"], ["d", "b", "e"]]
    gains, penalties = info_gain(sims), redundancy_penalty(ids)
    assert gains == pytest.approx([0.60, 0.275], abs=1e-12)          # G¹ = (0.9+0.3)/2; G² = (0.05+0.5)/2
    assert penalties == pytest.approx([0.0, 1 / 3], abs=1e-12)       # P² = 1 of 3 docs seen before
    steps = combine_step_rewards(gains, penalties, cfg)
    # 0.6 · 0.60 = 0.36;  0.6 · (0.275 − 1/3) = 0.6 · (−0.058333…) = −0.035 exactly
    assert steps == pytest.approx([0.36, -0.035], abs=1e-12)

    # Final turn: answer "Barack Obama" vs gold "Obama" → F1 = 2/3 → 0.6667 (4 decimals);
    # queries hit one of two key groups exactly → r_key = (1 + 0)/2 = 0.5.
    response = ("<search>obama birthplace</search>\n<information>...</information>"
                "<search>obama wife</search>\n<information>...</information>"
                "<think>done</think><answer>Barack Obama</answer>")
    truth = {"target": ["Obama"], "search_keys": [["obama birthplace"], ["michelle robinson college"]]}
    score = score_trajectory(response, None, truth, [], cfg)          # rounds (and queries) parsed from the text
    assert score.answer_f1 == 0.6667 and score.key_reward == 0.5
    assert score.overall == pytest.approx(0.6667 + 0.618 * 0.5, abs=1e-12)     # = 0.9757 ≈ 0.976
    assert round(score.overall, 3) == 0.976

    scores = place_token_rewards(MASK, [steps], POSITIONS, [score.overall])
    expected = torch.zeros(1, 14)
    expected[0, 2], expected[0, 6], expected[0, 11] = 0.36, -0.035, 0.9757
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, expected, atol=1e-7, rtol=0)


def test_placement_writes_min_count_and_assigns_outcome():
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    # row 0: 3 step rewards but 2 positions → only 2 written; outcome at 4 (last mask-1)
    # row 1: step at 3 collides with the last generated token → the outcome overwrites it (assigned, not added)
    out = place_token_rewards(mask, [[0.1, 0.2, 0.3], [0.5]], [[0, 3], [3]], [1.0, -1.0])
    assert out[0].tolist() == pytest.approx([0.1, 0, 0, 0.2, 1.0, 0])
    assert out[1].tolist() == pytest.approx([0, 0, 0, -1.0, 0, 0])
    # an all-zero mask row receives nothing
    assert place_token_rewards(torch.zeros(1, 3), [[]], [[]], [1.0]).tolist() == [[0, 0, 0]]


def test_placement_rejects_positions_off_generated_tokens():
    with pytest.raises(ValueError, match=r"search_end_positions\[0\]\[0\] = 3 is not a generated token"):
        place_token_rewards(MASK, [[0.1]], [[3]], [0.0])
    with pytest.raises(IndexError, match=r"search_end_positions\[0\]\[1\] = 14 is outside the response"):
        place_token_rewards(MASK, [[0.1, 0.2]], [[2, 14]], [0.0])


def test_grpo_scalar_is_sum_of_token_rewards():
    scores = torch.tensor([[0.36, 0.0, -0.035, 0.9757], [0.0, 0.0, 0.0, -1.0]])
    # 0.36 − 0.035 + 0.9757 = 1.3007
    assert trajectory_scalar_rewards(scores).tolist() == pytest.approx([1.3007, -1.0], abs=1e-6)


def _real_batch():
    """Three real trajectories over wiki-18 passages: gold docs g1, g2 and distractors."""
    p = wiki_passages()
    g1, g2, x1, x2, x3 = (dict(p[i]) for i in (10, 20, 30, 40, 50))
    rounds_a = [{"query": "q one", "docs": [g1, g2, x1]}, {"query": "q two", "docs": [g1, x2, x3]}]

    def obs(docs):
        return f"\n\n<information> {format_docs(docs).strip()} </information>\n\n"

    text_a = ("<search>q one</search>" + obs(rounds_a[0]["docs"]) + "<search>q two</search>"
              + obs(rounds_a[1]["docs"]) + "<answer>Evan Morris</answer>")
    text_b = "<search>q one</search>" + obs([x1]) + "<search>again</search>"        # never answered
    text_c = "<answer>wrong</answer>"
    T = 12
    mask = torch.zeros(3, T, dtype=torch.long)
    mask[0, [0, 1, 4, 5, 8, 9]] = 1        # searches end at 1 and 5; answer ends at 9
    mask[1, [0, 1, 3, 4, 5]] = 1
    mask[2, [0, 1, 2]] = 1
    non_tensors = {
        "response_text": [text_a, text_b, text_c],
        "rounds": [rounds_a, [{"query": "q one", "docs": [x1]}], []],
        "search_end_positions": [[1, 5], [1], []],
        "ground_truth": [{"target": ["Evan Morris"], "search_keys": [["q one"], ["zzz"]]},
                         {"target": ["x"], "search_keys": []},
                         {"target": ["right"], "search_keys": []}],
        "support_docs": [[{"title": g1["title"], "paragraph_text": g1["text"]}, g2["text"]], [g1["text"]], []],
    }
    return DataProto.from_dict(tensors={"response_mask": mask}, non_tensors=non_tensors), mask


def test_compute_token_rewards_on_real_dataproto():
    data, mask = _real_batch()
    scores, metrics, per_sample = compute_token_rewards(data, RewardConfig())
    assert scores.shape == (3, 12) and scores.dtype == torch.float32
    # Sample a: round 1 retrieves g1 and g2 verbatim → c¹ = [1, 1] → G¹ = 1, P¹ = 0 → 0.6 · 1 = 0.6 at token 1.
    # Round 2: memory already 1 → G² = 0; g1 repeats → P² = 1/3 → 0.6 · (0 − 1/3) = −0.2 at token 5.
    # Answer exact → F1 = 1; key groups [["q one"], ["zzz"]] → r_key = (1 + 0)/2 → 1 + 0.618 · 0.5 = 1.309 at 9.
    a = per_sample[0]
    assert a.info_gain == pytest.approx([1.0, 0.0], abs=1e-9)
    assert a.redundancy == pytest.approx([0.0, 1 / 3], abs=1e-12)
    assert scores[0].tolist() == pytest.approx([0, 0.6, 0, 0, 0, -0.2, 0, 0, 0, 1.309, 0, 0], abs=1e-6)
    # Sample b ends in a search: format fails → −1 at its last generated token, no step rewards.
    assert scores[1].tolist() == pytest.approx([0, 0, 0, 0, 0, -1.0, 0, 0, 0, 0, 0, 0])
    assert per_sample[1].step_rewards == [] and per_sample[1].format_ok is False
    # Sample c: valid format, wrong answer, no gold docs → 0 everywhere.
    assert scores[2].abs().sum().item() == 0.0 and per_sample[2].info_gain == []
    # Metrics: overall mean = (1.309 − 1 + 0)/3; info-gain mean over the 3 rounds that have one = (1 + 0 + G_b)/3.
    assert metrics["reward/overall/mean"] == pytest.approx((1.309 - 1.0) / 3, abs=1e-9)
    assert metrics["reward/format_ok/mean"] == pytest.approx(2 / 3)
    assert metrics["reward/info_gain/mean"] == pytest.approx((1.0 + 0.0 + per_sample[1].info_gain[0]) / 3)
    assert set(metrics) == {f"reward/{k}/mean" for k in ("answer_f1", "answer_em", "format_ok", "key_reward",
                                                          "info_gain", "redundancy", "step_reward", "overall")}
    # The same batch through the slow sklearn + loop reference gives the same tensor.
    nt = data.non_tensor_batch
    ref = reference_token_scores(mask, list(nt["response_text"]), list(nt["rounds"]),
                                 list(nt["search_end_positions"]), list(nt["ground_truth"]),
                                 list(nt["support_docs"]), RewardConfig())
    assert torch.allclose(scores, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ablation, expected_row0", [
    # plain PPO: answer F1 only at the last token
    ("ppo", [0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 0, 0]),
    # w/o key reward: step rewards unchanged, outcome = F1 = 1
    ("wo_key_reward", [0, 0.6, 0, 0, 0, -0.2, 0, 0, 0, 1.0, 0, 0]),
    # w/o penalty: 0.6 · G only → 0.6, 0
    ("wo_penalty", [0, 0.6, 0, 0, 0, 0, 0, 0, 0, 1.309, 0, 0]),
    # w/o info gain: −0.6 · P only → 0, −0.2
    ("wo_info_gain", [0, 0, 0, 0, 0, -0.2, 0, 0, 0, 1.309, 0, 0]),
    # w/o step rewards: outcome only, with the key reward
    ("wo_steps_reward", [0, 0, 0, 0, 0, 0, 0, 0, 0, 1.309, 0, 0]),
])
def test_ablations_are_one_override_each(ablation, expected_row0):
    data, _ = _real_batch()
    scores, _, _ = compute_token_rewards(data, RewardConfig.for_ablation(ablation))
    assert scores[0].tolist() == pytest.approx(expected_row0, abs=1e-6)


def test_paper_format_failure_value_and_latest_mode():
    data, _ = _real_batch()
    scores, _, _ = compute_token_rewards(data, RewardConfig(format_fail_score=0.0))
    assert scores[1].abs().sum().item() == 0.0                         # the paper: answer reward 0
    kept, _, per_sample = compute_token_rewards(data, RewardConfig(step_rewards_on_format_fail=True))
    assert len(per_sample[1].step_rewards) == 1 and kept[1, 1].item() == pytest.approx(per_sample[1].step_rewards[0])


def test_missing_keys_are_named():
    data, _ = _real_batch()
    with pytest.raises(KeyError, match=r"needs non-tensors \['support_docs'\]"):
        compute_token_rewards(data.select(non_tensor_batch_keys=["response_text", "rounds", "search_end_positions",
                                                                  "ground_truth"]), RewardConfig())
    bad = DataProto.from_dict(tensors={"response_mask": torch.ones(1, 2)}, non_tensors={
        "response_text": ["<answer>x</answer>"], "rounds": [[]], "search_end_positions": [[]],
        "ground_truth": [{"answer": "x"}], "support_docs": [[]]})
    with pytest.raises(KeyError, match="sample 0: .*ground_truth must be a dict with 'target'"):
        compute_token_rewards(bad, RewardConfig())


def test_random_batches_match_reference():
    """60 randomized trajectories with real passages, ids and rank positions: fast path == slow reference."""
    rng = random.Random(3)
    passages = wiki_passages()
    texts, rounds, positions, truths, supports = [], [], [], [], []
    T = 40
    mask = torch.zeros(60, T, dtype=torch.long)
    for b in range(60):
        round_texts, golds = random_case(rng)
        # ids from a hash of the text, folded to 50 values so that different texts sometimes share an id
        rnds = [{"query": f"q{t}",
                 "docs": [{"id": str(zlib.crc32(d.encode()) % 50), "title": "t", "text": d} for d in r]}
                for t, r in enumerate(round_texts)]
        pos = sorted(rng.sample(range(T - 1), len(rnds)))
        mask[b, pos] = 1
        mask[b, T - 1 - rng.randrange(3)] = 1
        answer = rng.choice(passages)["title"]
        texts.append("".join(f"<search>{r['query']}</search>" for r in rnds) + f"<answer>{answer}</answer>"
                     + ("" if rng.random() < 0.8 else " trailing"))
        rounds.append(rnds), positions.append(pos), supports.append(golds)
        truths.append({"target": [rng.choice(passages)["title"], answer if rng.random() < 0.5 else "zz"],
                       "search_keys": [["q0"], ["q1 extra"]]})
    ref = reference_token_scores(mask, texts, rounds, positions, truths, supports, RewardConfig())
    data = DataProto.from_dict(tensors={"response_mask": mask}, non_tensors={
        "response_text": texts, "rounds": rounds, "search_end_positions": positions, "ground_truth": truths,
        "support_docs": supports})
    scores, _, _ = compute_token_rewards(data, RewardConfig())
    assert torch.allclose(scores, ref, atol=1e-6, rtol=0)
    assert (scores != 0).sum() > 60                                     # step rewards were actually placed


def test_parquet_style_numpy_ground_truth():
    """Rows read back from parquet hold numpy arrays where the JSON had lists; scores must not change."""
    p = wiki_passages()
    response = "<search>q one</search><information>x</information><answer>Evan Morris</answer>"
    rounds = [{"query": "q one", "docs": [dict(p[0]), dict(p[1])]}]
    as_lists = score_trajectory(response, rounds, {"target": ["Evan Morris"], "search_keys": [["q one"], ["zz"]]},
                                [{"title": p[0]["title"], "text": p[0]["text"], "paragraph_text": None}],
                                RewardConfig())
    as_arrays = score_trajectory(
        response, rounds,
        {"target": np.array(["Evan Morris"], dtype=object),
         "search_keys": np.array([np.array(["q one"], dtype=object), np.array(["zz"], dtype=object)], dtype=object)},
        np.array([{"title": p[0]["title"], "text": p[0]["text"], "paragraph_text": None}], dtype=object),
        RewardConfig())
    assert as_arrays == as_lists
    # p[0] is the gold doc itself → c = 1 → G¹ = 1; answer exact, r_key = 1/2 → 1 + 0.309 = 1.309
    assert as_lists.info_gain == pytest.approx([1.0]) and as_lists.overall == pytest.approx(1.309)
