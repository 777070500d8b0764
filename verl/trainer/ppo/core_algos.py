"""StePPO / PPO / GRPO algorithms as pure tensor functions.

Letters: B batch, T response length, G group size. Every mask is the (B, T) `response_mask`:
1 on model-generated tokens, 0 on observation (retrieved) tokens and padding.

Sources: PPO (Schulman et al. 2017, arXiv 1707.06347), GAE (Schulman et al. 2015, arXiv 1506.02438),
KL control (Ziegler et al. 2019, arXiv 1909.08593), GRPO (Shao et al. 2024, arXiv 2402.03300),
RLOO (Ahmadian et al. 2024, arXiv 2402.14740), REINFORCE++ (Hu 2025, arXiv 2501.03262),
dual clip (Ye et al. 2019, arXiv 1912.09729), StepSearch (Wang et al. 2025, arXiv 2505.15107).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from verl.utils.torch_functional import masked_mean, masked_whiten

__all__ = [
    "discounted_reverse_cumsum", "compute_gae_advantage_return", "compute_grpo_outcome_advantage",
    "compute_rloo_outcome_advantage", "compute_reinforce_plus_plus_advantage", "AdvantageInputs",
    "AdvantageEstimator", "ADVANTAGE_ESTIMATORS", "compute_advantage", "kl_penalty", "KL_ESTIMATORS",
    "FixedKLController", "AdaptiveKLController", "build_kl_controller", "apply_kl_penalty", "compute_kl_loss",
    "compute_policy_loss", "compute_value_loss", "compute_entropy_loss", "agg_loss", "agg_denominator",
    "LOSS_AGG_MODES", "masked_mean", "masked_whiten",
]

_SCAN_CHUNK = 64  # block length of the chunked reverse scan (a (64, 64) discount matrix)


# ---------------------------------------------------------------------------------------------------------------------
# Discounted reverse scan
# ---------------------------------------------------------------------------------------------------------------------
def discounted_reverse_cumsum(x: torch.Tensor, discount: float) -> torch.Tensor:
    """y_t = Σ_{k≥t} discount^(k−t) · x_k along the last dim.

    x: (B, T) float. Returns (B, T) of the same dtype.

    Replaces the loop ``for t in reversed(range(T)): y[:, t] = x[:, t] + discount * y[:, t + 1]``.
    T is cut into blocks of C = 64: inside a block the sum is one matmul with the upper-triangular
    matrix M[t, k] = discount^(k−t) (k ≥ t); the blocks are then chained from the right,
    y_block[t] += discount^(C−t) · y_next_block[0]. Powers never exceed C, so nothing under- or
    overflows, unlike the closed form Σ_k discount^k x_k / discount^t.
    """
    if x.dim() != 2:
        raise ValueError(f"discounted_reverse_cumsum: x must be (B, T), got shape {tuple(x.shape)}")
    if discount == 1.0:  # a plain reverse cumulative sum
        return torch.flip(torch.cumsum(torch.flip(x, dims=[1]), dim=1), dims=[1])
    B, T = x.shape
    C = _SCAN_CHUNK
    n_blocks = -(-T // C)
    xp = torch.nn.functional.pad(x, (0, n_blocks * C - T)).view(B, n_blocks, C)  # (B, N, C)
    steps = torch.arange(C, device=x.device, dtype=x.dtype)
    gap = steps.view(1, C) - steps.view(C, 1)  # gap[t, k] = k − t
    M = torch.where(gap >= 0, torch.tensor(discount, dtype=x.dtype, device=x.device) ** gap.clamp(min=0),
                    torch.zeros((), dtype=x.dtype, device=x.device))  # (C, C)
    y = xp @ M.T  # (B, N, C): y[..., t] = Σ_k M[t, k] x[..., k]
    carry_scale = torch.tensor(discount, dtype=x.dtype, device=x.device) ** (C - steps)  # discount^(C−t)
    carry = torch.zeros(B, dtype=x.dtype, device=x.device)  # y of the first step of the next block
    for n in range(n_blocks - 1, -1, -1):
        y[:, n] += carry_scale * carry.unsqueeze(1)
        carry = y[:, n, 0]
    return y.reshape(B, n_blocks * C)[:, :T]


# ---------------------------------------------------------------------------------------------------------------------
# Advantage estimators
# ---------------------------------------------------------------------------------------------------------------------
def _as_float(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 when given float64 (tests compare float64 against loops)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_same_shape(**tensors: torch.Tensor) -> tuple[int, int]:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected (B, T) tensors of one shape, got {shapes}")
    return first


def _gae_over_generated_tokens(rewards, values, response_mask, gamma, lam):
    """GAE on the chain of generated tokens only (observation tokens skipped, not zero-reward steps).

    Loop it replaces (per row): for t from T−1 down to 0, if mask[t]:
        δ_t = r_t + γ·V_next − V_t ; A_t = δ_t + γλ·A_next ; V_next, A_next = V_t, A_t
    Vectorized: move each row's generated tokens to the front (a scatter by their rank), run the
    plain recursion there with V = 0 after the last one, and gather back.
    """
    B, T = rewards.shape
    valid = response_mask.bool()
    maskf = response_mask.to(rewards.dtype)
    if gamma == 1.0 and lam == 1.0:  # StepSearch's setting: the δs telescope to A_t = Σ_{k≥t} r_k − V_t
        returns = discounted_reverse_cumsum(rewards * maskf, 1.0) * maskf  # reward-to-go over generated tokens
        return returns - values * maskf, returns
    # index of each generated token in its row's chain (a float cumsum is exact below 2^24 tokens and
    # several times faster than an int64 one on CPU); masked tokens go to a dump column T
    dest = (torch.cumsum(maskf, dim=1).long() - 1).masked_fill_(~valid, T)  # (B, T)
    both = torch.stack([rewards * maskf, values * maskf])  # (2, B, T)
    compact = torch.zeros(2, B, T + 1, dtype=rewards.dtype, device=rewards.device)
    compact = compact.scatter_(2, dest.expand(2, B, T), both)[:, :, :T]  # generated tokens first, zeros after
    r_c, v_c = compact[0], compact[1]
    next_v = torch.nn.functional.pad(v_c[:, 1:], (0, 1))  # V_{t+1} along the chain, 0 after the last token
    deltas = r_c + gamma * next_v - v_c  # δ_t = r_t + γ V_{t+1} − V_t (0 past the chain)
    adv_c = discounted_reverse_cumsum(deltas, gamma * lam)  # A_t = Σ_k (γλ)^k δ_{t+k}
    advantages = torch.gather(adv_c, 1, dest.clamp_(max=T - 1)) * maskf
    returns = (advantages + values) * maskf
    return advantages, returns


def _gae_over_all_positions(rewards, values, gamma, lam):
    """GAE over every response position, observations and padding included (released StepSearch code).

    δ_t = r_t + γ·V_{t+1} − V_t with V_T = 0; A_t = δ_t + γλ·A_{t+1}; R_t = A_t + V_t.
    """
    next_v = torch.nn.functional.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_v - values
    advantages = discounted_reverse_cumsum(deltas, gamma * lam)
    return advantages, advantages + values


def compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                 response_mask: torch.Tensor, gamma: float, lam: float,
                                 skip_masked: bool = True, whiten: bool = True,
                                 whiten_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation on token-level rewards (GAE, arXiv 1506.02438 eq. 16).

        δ_t = r_t + γ V_{t+1} − V_t,   A_t = Σ_l (γλ)^l δ_{t+l},   R_t = A_t + V_t

    Args:
        token_level_rewards: (B, T) float, the step/outcome rewards minus the KL penalty.
        values: (B, T) float, V(s_t), the critic's value before each response token.
        response_mask: (B, T) 0/1, 1 on model-generated tokens.
        gamma, lam: the discount γ and the GAE λ (StepSearch uses γ = λ = 1).
        skip_masked: True (default): the chain runs over generated tokens only, so V and A of the
            token before an observation block link to the first token after it (StePPO, "I(o_t)").
            Rewards on masked tokens would be lost, so they raise a ValueError. Advantages and
            returns are 0 on masked positions.
            False: the recursion runs over every position as the released StepSearch/Search-R1 code
            does; values and rewards on observation tokens take part (docs/method.md §1.10 item 3).
        whiten: whiten the advantages (masked mean 0, unbiased variance 1); the returns are computed
            before whitening.
        whiten_mask: (B, T) mask for the whitening statistics; default response_mask. The released
            code uses the response part of attention_mask (observations included).

    Returns:
        advantages (B, T), returns (B, T); with whitening, positions outside whiten_mask are 0.
    """
    _check_same_shape(token_level_rewards=token_level_rewards, values=values, response_mask=response_mask)
    dtype = torch.promote_types(token_level_rewards.dtype, torch.float32)  # float64 stays float64
    rewards, values = token_level_rewards.to(dtype), values.to(dtype)
    if skip_masked:
        stray = (rewards != 0) & ~response_mask.bool()
        if stray.any():
            b, t = (int(i) for i in stray.nonzero()[0])
            raise ValueError(f"compute_gae_advantage_return: {int(stray.sum())} non-zero reward(s) sit on masked "
                             f"tokens (first at row {b}, position {t}); with skip_masked=True they would be lost. "
                             f"Place rewards on generated tokens (response_mask == 1) or use skip_masked=False")
        advantages, returns = _gae_over_generated_tokens(rewards, values, response_mask, gamma, lam)
    else:
        advantages, returns = _gae_over_all_positions(rewards, values, gamma, lam)
    if whiten:
        mask = (response_mask if whiten_mask is None else whiten_mask).to(dtype)
        advantages = masked_whiten(advantages, mask) * mask
    return advantages, returns


def _group_ids(index: Sequence | np.ndarray, batch_size: int, group_size: int | None) -> torch.Tensor:
    """Map group labels (uids, prompt indices) to 0..n_groups−1; check the group sizes when asked."""
    labels = np.asarray(index, dtype=object) if not isinstance(index, np.ndarray) else index
    if labels.shape != (batch_size,):
        raise ValueError(f"index must have one group label per row: shape ({batch_size},), got {labels.shape}")
    _, inverse, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
    if group_size is not None and np.any(counts != group_size):
        bad = {str(lbl): int(c) for lbl, c in zip(np.unique(labels.astype(str)), counts) if c != group_size}
        raise ValueError(f"every group must have group_size={group_size} rows (rollout.n); groups with other sizes: "
                         f"{dict(list(bad.items())[:5])}. Assign the uid before repeat(n, interleave=True)")
    return torch.as_tensor(inverse, dtype=torch.long)


def _group_mean_std(scores: torch.Tensor, gid: torch.Tensor):
    """Per-row mean and unbiased std of its group; a group of one gets mean 0, std 1 (as veRL)."""
    n_groups = int(gid.max()) + 1
    count = torch.zeros(n_groups, dtype=scores.dtype).index_add_(0, gid, torch.ones_like(scores))
    mean = torch.zeros(n_groups, dtype=scores.dtype).index_add_(0, gid, scores) / count
    sq_dev = (scores - mean[gid]) ** 2
    var = torch.zeros(n_groups, dtype=scores.dtype).index_add_(0, gid, sq_dev) / (count - 1).clamp(min=1)
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(var), var.sqrt())
    return mean[gid], std[gid], count[gid]


def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   index: Sequence | np.ndarray, norm_adv_by_std: bool = True,
                                   epsilon: float = 1e-6, group_size: int | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantages (arXiv 2402.03300 §4.1.2), broadcast over the response tokens.

        s_i = Σ_t r_{i,t};   A_i = (s_i − mean_g(s)) / (std_g(s) + ε)   (std: unbiased)
    or A_i = s_i − mean_g(s) with norm_adv_by_std=False (Dr.GRPO). A group of one uses mean 0, std 1.

    Args:
        token_level_rewards: (B, T); response_mask: (B, T); index: (B,) group labels (the prompt uid).
        group_size: when given, every group must have exactly this many rows (ValueError otherwise).
    Returns: advantages (B, T), returns (B, T) — equal, zero outside the mask.
    """
    B, _ = _check_same_shape(token_level_rewards=token_level_rewards, response_mask=response_mask)
    gid = _group_ids(index, B, group_size)
    scores = _as_float(token_level_rewards).sum(dim=-1)  # (B,): step rewards simply add in (docs/method.md §1.11)
    mean, std, _ = _group_mean_std(scores, gid)
    adv = (scores - mean) / (std + epsilon) if norm_adv_by_std else scores - mean
    advantages = adv.unsqueeze(-1) * response_mask.to(adv.dtype)
    return advantages, advantages


def compute_rloo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                   index: Sequence | np.ndarray, group_size: int | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (arXiv 2402.14740 eq. 6): A_i = s_i − (1/(n−1)) Σ_{j≠i} s_j = n/(n−1) · (s_i − mean_g(s)).

    A group of one keeps A_i = s_i. Shapes as compute_grpo_outcome_advantage.
    """
    B, _ = _check_same_shape(token_level_rewards=token_level_rewards, response_mask=response_mask)
    gid = _group_ids(index, B, group_size)
    scores = _as_float(token_level_rewards).sum(dim=-1)
    mean, _, count = _group_mean_std(scores, gid)
    adv = torch.where(count > 1, count / (count - 1).clamp(min=1) * (scores - mean), scores)
    advantages = adv.unsqueeze(-1) * response_mask.to(adv.dtype)
    return advantages, advantages


def compute_reinforce_plus_plus_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                          gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (arXiv 2501.03262): G_t = Σ_{k≥t} γ^(k−t) r_k over generated tokens, A = whiten(G).

    token_level_rewards, response_mask: (B, T). Returns advantages (B, T) (0 off-mask), returns G (B, T).
    """
    _check_same_shape(token_level_rewards=token_level_rewards, response_mask=response_mask)
    mask = response_mask.float()
    returns = discounted_reverse_cumsum(token_level_rewards.float() * mask, gamma) * mask
    return masked_whiten(returns, mask) * mask, returns


# ---------------------------------------------------------------------------------------------------------------------
# Advantage estimator registry (algorithm.adv_estimator)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdvantageInputs:
    """What any estimator may read from a batch. B rows, T response positions.

    token_level_rewards, response_mask: (B, T); values: (B, T) critic values (critic estimators only);
    group_index: (B,) group labels (the prompt uid; group estimators only); group_size: rows per group (rollout.n);
    skip_masked / whiten_mask: GAE's observation handling (compute_gae_advantage_return).
    """

    token_level_rewards: torch.Tensor
    response_mask: torch.Tensor
    values: torch.Tensor | None = None
    group_index: Sequence | np.ndarray | None = None
    group_size: int | None = None
    skip_masked: bool = True
    whiten_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class AdvantageEstimator:
    """fn(inputs, algorithm config) -> (advantages (B, T), returns (B, T)). uses_critic: the trainer builds and
    trains a critic (values are read); uses_groups: needs rollout.n >= 2 samples per prompt."""

    fn: Callable[[AdvantageInputs, object], tuple[torch.Tensor, torch.Tensor]]
    uses_critic: bool
    uses_groups: bool


def _gae(x: AdvantageInputs, alg) -> tuple[torch.Tensor, torch.Tensor]:
    return compute_gae_advantage_return(x.token_level_rewards, x.values, x.response_mask, alg.gamma, alg.lam,
                                        skip_masked=x.skip_masked, whiten_mask=x.whiten_mask)


def _grpo(x: AdvantageInputs, alg) -> tuple[torch.Tensor, torch.Tensor]:
    return compute_grpo_outcome_advantage(x.token_level_rewards, x.response_mask, x.group_index,
                                          norm_adv_by_std=alg.norm_adv_by_std_in_grpo, group_size=x.group_size)


def _rloo(x: AdvantageInputs, alg) -> tuple[torch.Tensor, torch.Tensor]:
    return compute_rloo_outcome_advantage(x.token_level_rewards, x.response_mask, x.group_index,
                                          group_size=x.group_size)


def _reinforce_plus_plus(x: AdvantageInputs, alg) -> tuple[torch.Tensor, torch.Tensor]:
    return compute_reinforce_plus_plus_advantage(x.token_level_rewards, x.response_mask, alg.gamma)


# every estimator above, by its config name (algorithm.adv_estimator)
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(_gae, uses_critic=True, uses_groups=False),
    "grpo": AdvantageEstimator(_grpo, uses_critic=False, uses_groups=True),
    "rloo": AdvantageEstimator(_rloo, uses_critic=False, uses_groups=True),
    "reinforce_plus_plus": AdvantageEstimator(_reinforce_plus_plus, uses_critic=False, uses_groups=False),
}


def compute_advantage(name: str, inputs: AdvantageInputs, alg) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, both (B, T), by the registered estimator `name` (algorithm.adv_estimator)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"[algorithm] adv_estimator must be one of {sorted(ADVANTAGE_ESTIMATORS)}, got {name!r}")
    return ADVANTAGE_ESTIMATORS[name].fn(inputs, alg)


# ---------------------------------------------------------------------------------------------------------------------
# KL estimators and controllers
# ---------------------------------------------------------------------------------------------------------------------
def _kl_k1(log_ratio):  # log π − log π_ref
    return log_ratio


def _kl_abs(log_ratio):  # |log π − log π_ref|
    return log_ratio.abs()


def _kl_k2(log_ratio):  # ½ (log π − log π_ref)²
    return 0.5 * log_ratio.square()


def _kl_k3(log_ratio):
    """Schulman's k3 (http://joschu.net/blog/kl-approx.html): with x = log π_ref − log π, eˣ − x − 1 ≥ 0.

    x is clamped to ±20 and the result to [−10, 10], so one outlier token cannot explode the loss.
    """
    x = torch.clamp(-log_ratio, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(x) - x - 1.0, min=-10.0, max=10.0)


def _straight_through(estimator):
    """The estimator's value in the forward pass, the k2 gradient (unbiased for ∇KL) in the backward pass."""
    def fn(log_ratio):
        k2 = _kl_k2(log_ratio)
        return k2 + (estimator(log_ratio) - k2).detach()
    return fn


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "kl": _kl_k1, "k1": _kl_k1, "abs": _kl_abs, "mse": _kl_k2, "k2": _kl_k2, "low_var_kl": _kl_k3, "k3": _kl_k3,
    "k1+": _straight_through(_kl_k1), "k3+": _straight_through(_kl_k3), "low_var_kl+": _straight_through(_kl_k3),
}


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate between π (log_prob) and π_ref (ref_log_prob), both (B, T) -> (B, T).

    kind: kl/k1 = log π − log π_ref; abs = |k1|; mse/k2 = ½ k1²; low_var_kl/k3 = eˣ − x − 1 with
    x = log π_ref − log π; a trailing '+' gives the straight-through variant (value of the estimator,
    gradient of k2).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator '{kind}'; valid: {sorted(KL_ESTIMATORS)}")
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(f"kl_penalty: log_prob {tuple(log_prob.shape)} and ref_log_prob "
                         f"{tuple(ref_log_prob.shape)} must have the same shape")
    return KL_ESTIMATORS[kind](_as_float(log_prob) - _as_float(ref_log_prob))


class FixedKLController:
    """β stays at kl_coef."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"[kl_ctrl] kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Ziegler et al. 2019 (arXiv 1909.08593 §2.2): e = clip(KL/target − 1, −0.2, 0.2), β ← β·(1 + e·n/horizon)."""

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: int):
        if init_kl_coef < 0 or target_kl <= 0 or horizon <= 0:
            raise ValueError(f"[kl_ctrl] need kl_coef >= 0, target_kl > 0, horizon > 0; got kl_coef={init_kl_coef}, "
                             f"target_kl={target_kl}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target_kl)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def build_kl_controller(kind: str, kl_coef: float, target_kl: float = 0.1, horizon: int = 10000):
    """kind 'fixed' or 'adaptive' (the yaml `algorithm.kl_ctrl.type`)."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"[kl_ctrl] unknown type '{kind}'; valid: ['adaptive', 'fixed']")


def apply_kl_penalty(token_level_scores: torch.Tensor, old_log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                     response_mask: torch.Tensor, kl_ctrl, kind: str = "kl") -> tuple[torch.Tensor, dict]:
    """KL as a reward penalty (docs/method.md §1.10 item 2): r_t = score_t − β·KL_t on generated tokens.

    token_level_scores, old_log_probs, ref_log_probs, response_mask: (B, T).
    β is kl_ctrl.value *before* this batch; afterwards the controller is updated with the batch's
    mean per-sequence KL and n_steps = B. Returns token_level_rewards (B, T) and metrics.
    """
    _check_same_shape(token_level_scores=token_level_scores, old_log_probs=old_log_probs,
                      ref_log_probs=ref_log_probs, response_mask=response_mask)
    scores = _as_float(token_level_scores)
    mask = response_mask.to(scores.dtype)
    kld = kl_penalty(old_log_probs, ref_log_probs, kind).to(scores.dtype) * mask  # (B, T), 0 on observations
    beta = kl_ctrl.value
    token_level_rewards = scores - beta * kld
    current_kl = float(masked_mean(kld, mask, dim=-1).mean())  # mean over sequences of the per-sequence mean
    kl_ctrl.update(current_kl=current_kl, n_steps=token_level_scores.shape[0])
    return token_level_rewards, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}


def compute_kl_loss(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, response_mask: torch.Tensor,
                    kind: str = "low_var_kl", loss_agg_mode: str = "token-mean") -> torch.Tensor:
    """KL as a loss (GRPO-style): agg_t KL(π_θ ‖ π_ref)_t on the current log-probs. (B, T) inputs -> scalar."""
    return agg_loss(kl_penalty(log_prob, ref_log_prob, kind), response_mask, loss_agg_mode)


# ---------------------------------------------------------------------------------------------------------------------
# Loss aggregation
# ---------------------------------------------------------------------------------------------------------------------
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check_agg_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode '{mode}'; valid: {list(LOSS_AGG_MODES)}")


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    token-mean:              Σ_{b,t} l·m / Σ_{b,t} m
    seq-mean-token-sum:      mean over rows with ≥1 token of Σ_t l·m
    seq-mean-token-mean:     mean over rows with ≥1 token of (Σ_t l·m / Σ_t m)   (GRPO paper)
    seq-mean-token-sum-norm: Σ_{b,t} l·m / (B·T)                                 (Dr.GRPO, constant divisor)
    An empty mask gives 0 (still connected to the graph).
    """
    _check_agg_mode(mode)
    mask = loss_mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq-mean-token-sum-norm":
        return (loss_mat * mask).sum() / mask.numel()
    has_tokens = (mask.sum(dim=-1) > 0).to(loss_mat.dtype)  # (B,)
    per_seq = (loss_mat * mask).sum(dim=-1) if mode == "seq-mean-token-sum" else masked_mean(loss_mat, mask, dim=-1)
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)


def agg_denominator(loss_mask: torch.Tensor, mode: str) -> float:
    """What agg_loss divides by, so that micro-batch losses weighted by den_micro / den_mini sum to the
    mini-batch loss exactly (gradient accumulation): tokens, rows with tokens, or rows.
    """
    _check_agg_mode(mode)
    if mode == "token-mean":
        return float(loss_mask.sum())
    if mode == "seq-mean-token-sum-norm":
        return float(loss_mask.shape[0])
    return float((loss_mask.sum(dim=-1) > 0).sum())


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------
def compute_policy_loss(old_log_probs: torch.Tensor, log_probs: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, clip_ratio_low: float = 0.2, clip_ratio_high: float = 0.2,
                        clip_ratio_c: float | None = None, loss_agg_mode: str = "token-mean"
                        ) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate (arXiv 1707.06347 eq. 7) with asymmetric ε and dual clip (arXiv 1912.09729).

        ρ_t = exp(log π_θ − log π_old);   L_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_low, 1 + ε_high))
        dual clip, A_t < 0 only:          L_t = min(L_t, −A_t · c)              (c > 1)
        loss = agg(L, response_mask)      (StepSearch: 1/Σ I(o_t) Σ I(o_t) L_t with token-mean)

    The sign is flipped from the paper's objective because we minimize.

    Args: old_log_probs, log_probs, advantages, response_mask: (B, T); clip_ratio_c None (default) disables the
    dual clip, which neither the StepSearch paper nor its released code uses.
    Returns: loss (scalar), metrics actor/pg_clipfrac, actor/pg_clipfrac_lower, actor/ppo_kl (floats).
    """
    _check_same_shape(old_log_probs=old_log_probs, log_probs=log_probs, advantages=advantages,
                      response_mask=response_mask)
    if clip_ratio_c is not None and clip_ratio_c <= 1.0:
        raise ValueError(f"[actor] clip_ratio_c must be > 1 for the dual clip (or None to disable), got {clip_ratio_c}")
    mask = response_mask.float()
    log_ratio = torch.clamp(log_probs - old_log_probs, min=-20.0, max=20.0)  # keeps exp() finite
    ratio = torch.exp(log_ratio)
    ppo_kl = masked_mean(-log_ratio, mask)  # k1 estimate of KL(π_old ‖ π_θ)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clipped = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses1).float(), mask)
    if clip_ratio_c is not None:
        pg_losses3 = -advantages * clip_ratio_c
        dual = (advantages < 0) & (clipped > pg_losses3)
        pg_losses = torch.where(dual, pg_losses3, clipped)
        pg_clipfrac_lower = masked_mean(dual.float(), mask)
    else:
        pg_losses, pg_clipfrac_lower = clipped, torch.zeros(())
    loss = agg_loss(pg_losses, mask, loss_agg_mode)
    return loss, {"actor/pg_clipfrac": float(pg_clipfrac), "actor/pg_clipfrac_lower": float(pg_clipfrac_lower),
                  "actor/ppo_kl": float(ppo_kl.detach())}


def compute_value_loss(vpreds: torch.Tensor, values: torch.Tensor, returns: torch.Tensor,
                       response_mask: torch.Tensor, cliprange_value: float = 0.5,
                       loss_agg_mode: str = "token-mean") -> tuple[torch.Tensor, dict]:
    """Clipped value loss (PPO2 baseline implementation):

        V_clip = V_old + clip(V_θ − V_old, −ε_v, ε_v);   L = ½ · agg(max((V_θ − R)², (V_clip − R)²))

    Args: vpreds (B, T) current values V_θ; values (B, T) V_old from the rollout; returns (B, T) R;
          response_mask (B, T) the critic's loss mask.
    Returns: loss (scalar), metrics critic/vf_clipfrac, critic/vpred_mean (floats).
    """
    _check_same_shape(vpreds=vpreds, values=values, returns=returns, response_mask=response_mask)
    mask = response_mask.float()
    vpreds_clipped = values + torch.clamp(vpreds - values, -cliprange_value, cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpreds_clipped - returns) ** 2
    loss = 0.5 * agg_loss(torch.maximum(vf_losses1, vf_losses2), mask, loss_agg_mode)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return loss, {"critic/vf_clipfrac": float(vf_clipfrac), "critic/vpred_mean": float(masked_mean(vpreds.detach(), mask))}


def compute_entropy_loss(entropy: torch.Tensor, response_mask: torch.Tensor,
                         loss_agg_mode: str = "token-mean") -> torch.Tensor:
    """agg_t H(π_θ(·|s_t)); entropy, response_mask: (B, T) -> scalar (subtracted with entropy_coeff)."""
    return agg_loss(entropy, response_mask, loss_agg_mode)
