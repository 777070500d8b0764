"""core_algos against hand-worked numbers and slow reference loops (CPU, seeded)."""
import math

import numpy as np
import pytest
import torch

from verl.trainer.ppo import core_algos as ca
from verl.utils.torch_functional import masked_mean, masked_var, masked_whiten

pytestmark = pytest.mark.timeout(60)
F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------------------
# Reference loops, written independently of the vectorized code
# ---------------------------------------------------------------------------------------------------------------------
def gae_loop(rewards, values, mask, gamma, lam, skip_masked):
    """Per-row, per-token GAE. skip_masked: masked tokens neither update V_next nor A_next."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(T)):
            if skip_masked and mask[b][t] == 0:
                continue
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b][t]
            adv[b][t] = next_adv
    adv = torch.tensor(adv, dtype=F64)
    returns = adv + torch.as_tensor(values, dtype=F64)
    if skip_masked:
        returns = returns * torch.as_tensor(mask, dtype=F64)
    return adv, returns


def random_interleaved_mask(B, T, gen):
    """Rows of [generated run, observation run, ...] followed by right padding, like a rollout."""
    mask = torch.zeros(B, T)
    for b in range(B):
        length = int(torch.randint(1, T + 1, (1,), generator=gen))
        t, generated = 0, True
        while t < length:
            run = int(torch.randint(1, 6, (1,), generator=gen))
            mask[b, t:min(t + run, length)] = 1.0 if generated else 0.0
            t, generated = t + run, not generated
        mask[b, 0] = 1.0  # every response starts with a generated token
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------------
REWARDS_6 = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 1.0]], dtype=F64)
VALUES_6 = torch.tensor([[0.2, 0.4, 9.0, 9.0, 0.6, 0.8]], dtype=F64)  # 9.0 on the two observation tokens
MASK_6 = torch.tensor([[1, 1, 0, 0, 1, 1]], dtype=F64)


def test_gae_hand_worked_six_tokens_skips_observations():
    # γ = 0.9, λ = 0.8, γλ = 0.72. Chain over positions 0, 1, 4, 5 (V = .2 .4 .6 .8, r = 0 .5 0 1):
    # t=5: δ = 1 + 0.9·0 − 0.8 = 0.2                 A5 = 0.2
    # t=4: δ = 0 + 0.9·0.8 − 0.6 = 0.12              A4 = 0.12 + 0.72·0.2 = 0.264
    # t=1: δ = 0.5 + 0.9·0.6 − 0.4 = 0.64            A1 = 0.64 + 0.72·0.264 = 0.83008
    # t=0: δ = 0 + 0.9·0.4 − 0.2 = 0.16              A0 = 0.16 + 0.72·0.83008 = 0.7576576
    adv, ret = ca.compute_gae_advantage_return(REWARDS_6, VALUES_6, MASK_6, gamma=0.9, lam=0.8, whiten=False)
    expected_adv = torch.tensor([[0.7576576, 0.83008, 0.0, 0.0, 0.264, 0.2]], dtype=F64)
    # returns = A + V on generated tokens: 0.9576576, 1.23008, 0.864, 1.0
    expected_ret = torch.tensor([[0.9576576, 1.23008, 0.0, 0.0, 0.864, 1.0]], dtype=F64)
    torch.testing.assert_close(adv.double(), expected_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret.double(), expected_ret, atol=1e-6, rtol=0)


def test_gae_hand_worked_six_tokens_all_positions_released_behaviour():
    # skip_masked=False runs over every position; the observation values (9.0) enter the chain:
    # t=5: A = 0.2; t=4: A = 0.264 (as above)
    # t=3: δ = 0 + 0.9·0.6 − 9 = −8.46       A3 = −8.46 + 0.72·0.264 = −8.26992
    # t=2: δ = 0 + 0.9·9 − 9 = −0.9          A2 = −0.9 + 0.72·(−8.26992) = −6.8543424
    # t=1: δ = 0.5 + 0.9·9 − 0.4 = 8.2       A1 = 8.2 + 0.72·(−6.8543424) = 3.264873472
    # t=0: δ = 0.9·0.4 − 0.2 = 0.16          A0 = 0.16 + 0.72·3.264873472 = 2.51070889984
    adv, ret = ca.compute_gae_advantage_return(REWARDS_6.float(), VALUES_6.float(), MASK_6.float(), gamma=0.9,
                                               lam=0.8, skip_masked=False, whiten=False)
    expected = torch.tensor([[2.51070889984, 3.264873472, -6.8543424, -8.26992, 0.264, 0.2]], dtype=F64)
    torch.testing.assert_close(adv.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ret.double(), expected + VALUES_6, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
@pytest.mark.parametrize("skip_masked", [True, False])
def test_gae_vectorized_equals_reference_loop(gamma, lam, skip_masked):
    gen = torch.Generator().manual_seed(1234)
    B, T = 7, 150  # T > 2 scan blocks of 64
    mask = random_interleaved_mask(B, T, gen).double()
    values = torch.randn(B, T, generator=gen, dtype=F64)
    rewards = torch.randn(B, T, generator=gen, dtype=F64) * (mask if skip_masked else 1.0)
    ref_adv, ref_ret = gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam, skip_masked)
    adv, ret = ca.compute_gae_advantage_return(rewards, values, mask, gamma, lam, skip_masked=skip_masked,
                                               whiten=False)
    # with skip_masked the loop leaves masked positions at 0, as the vectorized version does
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-10, rtol=0)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-10, rtol=0)


def test_gae_values_on_masked_tokens_do_not_change_advantages():
    gen = torch.Generator().manual_seed(7)
    B, T = 4, 40
    mask = random_interleaved_mask(B, T, gen)
    values = torch.randn(B, T, generator=gen)
    rewards = torch.randn(B, T, generator=gen) * mask
    adv, ret = ca.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95)
    noisy = values + 100.0 * torch.randn(B, T, generator=gen) * (1 - mask)
    adv2, ret2 = ca.compute_gae_advantage_return(rewards, noisy, mask, 1.0, 0.95)
    torch.testing.assert_close(adv2, adv, atol=0, rtol=0)
    torch.testing.assert_close(ret2, ret, atol=0, rtol=0)
    # ...whereas the released all-positions recursion does feel them (γλ < 1)
    adv_all, _ = ca.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95, skip_masked=False)
    adv_all2, _ = ca.compute_gae_advantage_return(rewards, noisy, mask, 1.0, 0.95, skip_masked=False)
    assert (adv_all2 - adv_all).abs().max() > 1.0


def test_gae_rejects_reward_on_masked_token():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match=r"row 0, position 2"):
        ca.compute_gae_advantage_return(rewards, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 1.0)


def test_stepsearch_worked_example_token_rewards_to_advantages():
    """docs/method.md §1.9: two search rounds and a final answer, placed on a 14-token response, γ = λ = 1.

    Layout: gen 0-2 (`</search>` ends at 2) | obs 3-5 | gen 6-7 (`</search>` at 7) | obs 8-9 |
            gen 10-12 (`</answer>` ends at 12) | pad 13
    """
    step1 = 0.6 * (0.90 + 0.30) / 2                        # 0.6·G¹, G¹ = mean(0.90, 0.30) = 0.60 -> 0.36
    step2 = round(0.6 * ((0.05 + 0.50) / 2 - 1 / 3), 3)   # 0.6·(0.275 − 0.333) = −0.035
    overall = round(0.667 + 0.618 * 0.5, 3)               # F1 + γ_key·r_key = 0.976
    assert (step1, step2, overall) == (pytest.approx(0.36), -0.035, 0.976)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]], dtype=F64)
    scores = torch.zeros(1, 14, dtype=F64)
    scores[0, 2], scores[0, 7], scores[0, 12] = step1, step2, overall
    # KL reward penalty: log π_old − log π_ref = 0.1 on every generated token, β = 0.001 -> −0.0001 each
    ref = torch.full((1, 14), -2.0, dtype=F64)
    old = ref + 0.1 * mask + 5.0 * (1 - mask)  # junk on observations: must be ignored
    rewards, metrics = ca.apply_kl_penalty(scores, old, ref, mask, ca.FixedKLController(0.001), kind="kl")
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(0.1)
    values = torch.tensor([[0.5, 0.6, 0.7, 3.0, 3.0, 3.0, 0.8, 0.9, 3.0, 3.0, 0.9, 0.95, 1.0, 0.0]], dtype=F64)
    adv, ret = ca.compute_gae_advantage_return(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    # With γ = λ = 1 the δs telescope: A_t = Σ_{generated k ≥ t} r_k − V_t.
    # generated tokens at or after t:   t=0:8  1:7  2:6  6:5  7:4  10:3  11:2  12:1
    expected_rtg = {0: 0.36 - 0.035 + 0.976 - 8e-4, 1: 0.36 - 0.035 + 0.976 - 7e-4, 2: 0.36 - 0.035 + 0.976 - 6e-4,
                    6: -0.035 + 0.976 - 5e-4, 7: -0.035 + 0.976 - 4e-4,
                    10: 0.976 - 3e-4, 11: 0.976 - 2e-4, 12: 0.976 - 1e-4}
    for t in range(14):
        if t in expected_rtg:
            assert adv[0, t].item() == pytest.approx(expected_rtg[t] - values[0, t].item(), abs=1e-9), t
            assert ret[0, t].item() == pytest.approx(expected_rtg[t], abs=1e-9), t  # returns = reward-to-go
        else:
            assert adv[0, t].item() == 0.0 and ret[0, t].item() == 0.0
    # The first step reward (0.36) credits only turn 1's tokens: A_2 − A_6 (with V added back) = 0.36 − 1e-4
    assert (ret[0, 2] - ret[0, 6]).item() == pytest.approx(0.36 - 1e-4, abs=1e-9)


def test_gae_whitening_uses_the_mask():
    gen = torch.Generator().manual_seed(3)
    mask = random_interleaved_mask(3, 20, gen)
    rewards = torch.randn(3, 20, generator=gen) * mask
    values = torch.randn(3, 20, generator=gen)
    adv, _ = ca.compute_gae_advantage_return(rewards, values, mask, 1.0, 1.0)
    valid = adv[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased std, as masked_var
    assert adv[~mask.bool()].abs().max().item() == 0.0


def test_gae_released_whitening_mask_includes_observations():
    # γ = λ = 1, V = 0, all positions in the chain; whitening over the response attention mask (all 8 tokens)
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.0], [0.0, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    attn = torch.ones(2, 4)
    adv, _ = ca.compute_gae_advantage_return(rewards, torch.zeros(2, 4), mask, 1.0, 1.0, skip_masked=False,
                                             whiten_mask=attn)
    # raw A: row 0 = (2, 2, 2, 2), row 1 = (4, 4, 0, 0); over all 8: mean 2, unbiased var (0·4 + 4·2 + 4·2)/7 = 16/7
    std = math.sqrt(16 / 7)
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2 / std, 2 / std, -2 / std, -2 / std]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Scan, masked statistics
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
@pytest.mark.parametrize("discount", [0.0, 0.3, 0.97, 1.0])
def test_discounted_reverse_cumsum_equals_loop(T, discount):
    x = torch.randn(3, T, generator=torch.Generator().manual_seed(T), dtype=F64)
    expected = torch.zeros_like(x)
    for b in range(3):
        running = 0.0
        for t in reversed(range(T)):
            running = x[b, t].item() + discount * running
            expected[b, t] = running
    torch.testing.assert_close(ca.discounted_reverse_cumsum(x, discount), expected, atol=1e-10, rtol=0)


def test_masked_statistics_hand_worked():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    # unbiased: ((1−2)² + 0 + (3−2)²) / (3 − 1) = 1
    assert masked_var(values, mask).item() == pytest.approx(1.0)
    white = masked_whiten(values, mask)
    torch.testing.assert_close(white[mask.bool()], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([1.5, 3.0]))
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# GRPO, RLOO, REINFORCE++
# ---------------------------------------------------------------------------------------------------------------------
def test_grpo_hand_worked_with_and_without_std():
    # group "a": scores 1, 3 (mean 2, unbiased std √2); group "b": a single row, score 5 (mean 0, std 1)
    rewards = torch.tensor([[0.0, 1.0], [1.0, 2.0], [5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    adv, ret = ca.compute_grpo_outcome_advantage(rewards, mask, np.array(["a", "a", "b"], dtype=object))
    s2 = math.sqrt(2)
    expected = torch.tensor([[-1 / (s2 + 1e-6)] * 2, [1 / (s2 + 1e-6)] * 2, [5 / (1 + 1e-6), 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, adv)
    adv_nostd, _ = ca.compute_grpo_outcome_advantage(rewards, mask, ["a", "a", "b"], norm_adv_by_std=False)
    torch.testing.assert_close(adv_nostd, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [5.0, 0.0]]))


def test_grpo_group_size_is_checked():
    rewards, mask = torch.ones(3, 2), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"group_size=2.*'b': 1"):
        ca.compute_grpo_outcome_advantage(rewards, mask, ["a", "a", "b"], group_size=2)


def test_grpo_and_rloo_equal_loops_on_random_groups():
    gen = torch.Generator().manual_seed(11)
    B, T = 24, 6
    rewards = torch.randn(B, T, generator=gen, dtype=F64)
    mask = random_interleaved_mask(B, T, gen).double()
    index = np.array([int(i) for i in torch.randint(0, 5, (B,), generator=gen)], dtype=object)
    scores = rewards.sum(-1).tolist()
    groups = {}
    for i, g in enumerate(index):
        groups.setdefault(g, []).append(scores[i])
    grpo, rloo = [], []
    for i, g in enumerate(index):
        members = groups[g]
        n = len(members)
        mean = sum(members) / n if n > 1 else 0.0
        std = math.sqrt(sum((m - sum(members) / n) ** 2 for m in members) / (n - 1)) if n > 1 else 1.0
        grpo.append((scores[i] - mean) / (std + 1e-6))
        rloo.append(scores[i] - (sum(members) - scores[i]) / (n - 1) if n > 1 else scores[i])
    adv, _ = ca.compute_grpo_outcome_advantage(rewards, mask, index)
    torch.testing.assert_close(adv.double(), torch.tensor(grpo, dtype=F64).unsqueeze(-1) * mask, atol=1e-6, rtol=0)
    adv_rloo, _ = ca.compute_rloo_outcome_advantage(rewards, mask, index)
    torch.testing.assert_close(adv_rloo.double(), torch.tensor(rloo, dtype=F64).unsqueeze(-1) * mask,
                               atol=1e-6, rtol=0)


def test_reinforce_plus_plus_hand_worked():
    # γ = 0.5; row 0: r = (1, 0, 2) -> G = (1 + 0.5·0 + 0.25·2, 0 + 0.5·2, 2) = (1.5, 1, 2)
    # row 1: r = (4, ·) with only t=0 generated -> G = (4, 0)... the masked token contributes nothing
    rewards = torch.tensor([[1.0, 0.0, 2.0], [4.0, 9.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, returns = ca.compute_reinforce_plus_plus_advantage(rewards, mask, gamma=0.5)
    torch.testing.assert_close(returns, torch.tensor([[1.5, 1.0, 2.0], [4.0, 0.0, 0.0]]))
    # whiten over {1.5, 1, 2, 4}: mean 2.125, unbiased var (0.390625+1.265625+0.015625+3.515625)/3 = 1.7291667
    std = math.sqrt(5.1875 / 3)
    expected = torch.tensor([[(1.5 - 2.125) / std, (1 - 2.125) / std, (2 - 2.125) / std],
                             [(4 - 2.125) / std, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------------------------------
LOGP = torch.tensor([[-1.0, -0.5]])
REF = torch.tensor([[-1.2, -0.1]])  # log π − log π_ref = (0.2, −0.4)


@pytest.mark.parametrize("kind,expected", [
    ("kl", [0.2, -0.4]), ("k1", [0.2, -0.4]),
    ("abs", [0.2, 0.4]),
    ("mse", [0.02, 0.08]), ("k2", [0.02, 0.08]),  # ½·0.2² = 0.02, ½·0.4² = 0.08
    # x = ref − logp = (−0.2, 0.4): e^−0.2 + 0.2 − 1 = 0.0187307531, e^0.4 − 0.4 − 1 = 0.0918246976
    ("low_var_kl", [0.0187307531, 0.0918246976]), ("k3", [0.0187307531, 0.0918246976]),
])
def test_kl_estimators_against_formula(kind, expected):
    torch.testing.assert_close(ca.kl_penalty(LOGP, REF, kind), torch.tensor([expected]), atol=1e-7, rtol=0)


def test_low_var_kl_is_clamped_and_straight_through_has_k2_gradient():
    # x = ref − logp = 30 -> clamped to 20; e^20 − 21 is huge -> clamped to 10
    assert ca.kl_penalty(torch.tensor([[0.0]]), torch.tensor([[30.0]]), "low_var_kl").item() == 10.0
    logp = LOGP.clone().requires_grad_(True)
    value = ca.kl_penalty(logp, REF, "k3+")
    torch.testing.assert_close(value.detach(), torch.tensor([[0.0187307531, 0.0918246976]]), atol=1e-7, rtol=0)
    value.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.2, -0.4]]))  # d/dlogp ½(logp − ref)² = logp − ref


def test_kl_unknown_kind_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'full'.*low_var_kl"):
        ca.kl_penalty(LOGP, REF, "full")


def test_kl_controllers():
    fixed = ca.FixedKLController(0.001)
    fixed.update(current_kl=5.0, n_steps=100)
    assert fixed.value == 0.001
    ctl = ca.AdaptiveKLController(init_kl_coef=0.1, target_kl=1.0, horizon=100)
    ctl.update(current_kl=1.5, n_steps=10)  # e = clip(1.5 − 1, ±0.2) = 0.2; β = 0.1·(1 + 0.2·10/100) = 0.102
    assert ctl.value == pytest.approx(0.102)
    ctl.update(current_kl=0.9, n_steps=10)  # e = −0.1; β = 0.102·(1 − 0.1·0.1) = 0.10098
    assert ctl.value == pytest.approx(0.10098)
    assert isinstance(ca.build_kl_controller("adaptive", 0.1), ca.AdaptiveKLController)
    with pytest.raises(ValueError, match=r"valid: \['adaptive', 'fixed'\]"):
        ca.build_kl_controller("pid", 0.1)


def test_apply_kl_penalty_uses_beta_before_update_and_masks_observations():
    scores = torch.tensor([[0.0, 1.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -9.0]])  # k1 = 0.5, 1.0, (8.0 on the masked token)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    ctl = ca.AdaptiveKLController(0.1, target_kl=0.5, horizon=10)
    rewards, metrics = ca.apply_kl_penalty(scores, old, ref, mask, ctl, kind="kl")
    # r = score − 0.1·k1 on generated tokens: (−0.05, 0.9, 0)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.9, 0.0]]))
    assert metrics["actor/reward_kl_penalty"] == pytest.approx(0.75)  # (0.5 + 1.0) / 2
    assert metrics["actor/reward_kl_penalty_coeff"] == 0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 1 / 10))  # e = clip(0.75/0.5 − 1) = 0.2, n = B = 1


def test_kl_loss_aggregates_current_log_probs():
    mask = torch.tensor([[1.0, 0.0]])
    loss = ca.compute_kl_loss(LOGP, REF, mask, kind="mse", loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(0.02)  # only the first token: ½·0.2²


# ---------------------------------------------------------------------------------------------------------------------
# Policy and value losses
# ---------------------------------------------------------------------------------------------------------------------
def policy_loss_and_grad(ratio, advantage, **kw):
    log_prob = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, metrics = ca.compute_policy_loss(torch.zeros(1, 1), log_prob, torch.tensor([[advantage]]),
                                           torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), log_prob.grad.item(), metrics


@pytest.mark.parametrize("ratio,adv,kw,loss,grad,clipfrac,lower", [
    # inside the trust region: L = −A·ρ = −2·1.1, dL/dlogπ = −A·ρ = −2.2
    (1.1, 2.0, {}, -2.2, -2.2, 0.0, 0.0),
    # A > 0, ρ = 1.5 > 1.2: L = max(−3.0, −2·1.2) = −2.4, no gradient
    (1.5, 2.0, {}, -2.4, 0.0, 1.0, 0.0),
    # clip-higher ε_high = 0.28: ρ = 1.25 is inside, L = −2.5, grad −2.5
    (1.25, 2.0, {"clip_ratio_high": 0.28}, -2.5, -2.5, 0.0, 0.0),
    # A < 0, ρ = 0.75 < 0.8: L = max(2·0.75, 2·0.8) = 1.6, clipped, no gradient
    (0.75, -2.0, {}, 1.6, 0.0, 1.0, 0.0),
    # A < 0, ρ = 1.5: L = max(3.0, 2.4) = 3.0 < c·|A| = 6, unclipped, grad = −A·ρ = 3.0
    (1.5, -2.0, {}, 3.0, 3.0, 0.0, 0.0),
    # A < 0, ρ = 4, dual clip c = 3: L = max(8, 2.4) = 8 > c·|A| = 6 -> L = −A·c = 6, no gradient
    (4.0, -2.0, {"clip_ratio_c": 3.0}, 6.0, 0.0, 0.0, 1.0),
    # the default has no dual clip (neither the paper nor the released code uses one): L = 8, grad = −A·ρ = 8
    (4.0, -2.0, {}, 8.0, 8.0, 0.0, 0.0),
])
def test_policy_loss_values_and_gradients(ratio, adv, kw, loss, grad, clipfrac, lower):
    got_loss, got_grad, metrics = policy_loss_and_grad(ratio, adv, **kw)
    assert got_loss == pytest.approx(loss, abs=1e-6)
    assert got_grad == pytest.approx(grad, abs=1e-6)
    assert metrics["actor/pg_clipfrac"] == clipfrac
    assert metrics["actor/pg_clipfrac_lower"] == lower
    assert metrics["actor/ppo_kl"] == pytest.approx(-math.log(ratio), abs=1e-6)


def test_policy_loss_ignores_masked_tokens_and_checks_dual_clip():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.1), 5.0]], requires_grad=True)
    loss, _ = ca.compute_policy_loss(old, logp, torch.tensor([[2.0, 1e6]]), torch.tensor([[1.0, 0.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(-2.2) and logp.grad[0, 1].item() == 0.0
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        ca.compute_policy_loss(old, logp, old, old + 1, clip_ratio_c=0.5)


def test_value_loss_clipping():
    # row 0: V_θ = 1.0, V_old = 0.2, R = 1.5, ε = 0.5 -> V_clip = 0.7; (1−1.5)² = 0.25 < (0.7−1.5)² = 0.64
    # row 1: V_θ = 0.5, V_old = 0.2, R = 1.5 -> V_clip = 0.5; both losses (0.5−1.5)² = 1.0
    # L = ½·mean(0.64, 1.0) = 0.41; dL/dV_θ: row 0 -> 0 (the clipped branch), row 1 -> ½·½·2·(0.5−1.5) = −0.5
    vpreds = torch.tensor([[1.0], [0.5]], requires_grad=True)
    loss, metrics = ca.compute_value_loss(vpreds, torch.tensor([[0.2], [0.2]]), torch.tensor([[1.5], [1.5]]),
                                          torch.ones(2, 1), cliprange_value=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.41)
    torch.testing.assert_close(vpreds.grad, torch.tensor([[0.0], [-0.5]]))
    assert metrics["critic/vf_clipfrac"] == 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------
LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


@pytest.mark.parametrize("mask,mode,expected", [
    ([[1, 1, 0], [1, 0, 0]], "token-mean", 7 / 3),             # (1 + 2 + 4) / 3
    ([[1, 1, 0], [1, 0, 0]], "seq-mean-token-sum", 3.5),       # ((1 + 2) + 4) / 2
    ([[1, 1, 0], [1, 0, 0]], "seq-mean-token-mean", 2.75),     # (1.5 + 4) / 2
    ([[1, 1, 0], [1, 0, 0]], "seq-mean-token-sum-norm", 7 / 6),  # 7 / (B·T = 6)
    ([[1, 1, 0], [0, 0, 0]], "token-mean", 1.5),               # (1 + 2) / 2
    ([[1, 1, 0], [0, 0, 0]], "seq-mean-token-sum", 3.0),       # the empty row does not count
    ([[1, 1, 0], [0, 0, 0]], "seq-mean-token-mean", 1.5),
    ([[1, 1, 0], [0, 0, 0]], "seq-mean-token-sum-norm", 0.5),  # 3 / 6
    ([[0, 0, 0], [0, 0, 0]], "token-mean", 0.0),
])
def test_agg_loss_modes(mask, mode, expected):
    assert ca.agg_loss(LOSS_MAT, torch.tensor(mask, dtype=torch.float32), mode).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ca.LOSS_AGG_MODES)
def test_agg_denominator_makes_micro_batches_sum_to_the_batch_loss(mode):
    gen = torch.Generator().manual_seed(5)
    loss_mat = torch.randn(6, 5, generator=gen)
    mask = random_interleaved_mask(6, 5, gen)
    mask[3] = 0  # a row without generated tokens
    total = ca.agg_denominator(mask, mode)
    pieces = sum(ca.agg_loss(loss_mat[i:i + 2], mask[i:i + 2], mode) * ca.agg_denominator(mask[i:i + 2], mode) / total
                 for i in range(0, 6, 2))
    assert pieces.item() == pytest.approx(ca.agg_loss(loss_mat, mask, mode).item(), abs=1e-6)


def test_agg_loss_unknown_mode():
    with pytest.raises(ValueError, match=r"unknown loss_agg_mode 'mean'.*token-mean"):
        ca.agg_loss(LOSS_MAT, torch.ones(2, 3), "mean")
