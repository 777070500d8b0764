"""Token-level rewards: put each round's step reward and the outcome reward on the response tokens.

docs/method.md §1.8: step_rewards[t] goes at ``search_end_positions[t]`` (the last generated token of the turn that ended in
the t-th search, recorded by the rollout; only min(#step rewards, #positions) are written); the outcome reward is
then ASSIGNED (not added) at the last token with response_mask == 1. Every other token gets 0.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .reward_config import RewardConfig
from stepsearch.agent.record import TrajectoryRecord

from .trajectory_score import TrajectoryScore, reward_metrics, score_record, score_trajectory, sparse_token_rewards

__all__ = ["place_token_rewards", "compute_token_rewards", "reward_metrics", "trajectory_scalar_rewards",
           "REQUIRED_NON_TENSOR_KEYS", "RECORD_KEY"]

REQUIRED_NON_TENSOR_KEYS = ("response_text", "ground_truth", "support_docs")
RECORD_KEY = "record"
"""The rollout's per-trajectory record (``stepsearch.agent.record.TrajectoryRecord.to_dict()``). Without it (other
rollout functions, older data) the non-tensors ``rounds`` and ``search_end_positions`` are read instead."""


def _positions(value, b: int) -> list[int]:
    """search_end_positions of sample b as a list of ints."""
    if value is None:
        return []
    if hasattr(value, "tolist"):
        value = value.tolist()
    try:
        return [int(p) for p in value]
    except (TypeError, ValueError):
        raise TypeError(f"search_end_positions[{b}] must be a list of ints, got {value!r}") from None


def place_token_rewards(response_mask: torch.Tensor, step_rewards: Sequence[Sequence[float]],
                        step_positions: Sequence[Sequence[int]], outcome_rewards: Sequence[float]) -> torch.Tensor:
    """Token-level scores (B, T) float32.

    response_mask: (B, T), 1 on model-generated tokens. step_rewards[b][t] is written at step_positions[b][t]
    (the first min(len, len) pairs); outcome_rewards[b] is then assigned at the last response_mask == 1 token
    (nothing is placed for a row without any such token). A step position outside [0, T) or on a token with
    response_mask == 0 is an error: it means the positions do not index this response.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be (B, T), got shape {tuple(response_mask.shape)}")
    B, T = response_mask.shape
    for name, seq in (("step_rewards", step_rewards), ("step_positions", step_positions),
                      ("outcome_rewards", outcome_rewards)):
        if len(seq) != B:
            raise ValueError(f"{name} has {len(seq)} rows but response_mask has B={B}")
    mask = response_mask.detach().cpu().bool()
    scores = torch.zeros((B, T), dtype=torch.float32)
    # Last generated token per row: the largest index with mask 1 (argmax over reversed mask finds it in one go).
    has_token = mask.any(dim=1)
    last = (T - 1 - torch.flip(mask, dims=[1]).int().argmax(dim=1)).tolist()          # (B,)
    for b in range(B):
        positions = list(step_positions[b])[:len(step_rewards[b])]
        for t, pos in enumerate(positions):
            if not 0 <= pos < T:
                raise IndexError(f"search_end_positions[{b}][{t}] = {pos} is outside the response (T={T})")
            if not mask[b, pos]:
                raise ValueError(f"search_end_positions[{b}][{t}] = {pos} is not a generated token "
                                 f"(response_mask is 0 there); positions must index the sampled </search> token")
        sparse = sparse_token_rewards(step_rewards[b], positions, last[b] if has_token[b] else None,
                                      float(outcome_rewards[b]))
        for pos, value in sparse.items():
            scores[b, pos] = value
    return scores


def compute_token_rewards(data, cfg: RewardConfig) -> tuple[torch.Tensor, dict[str, float], list[TrajectoryScore]]:
    """Score a rollout batch (a DataProto) and place the rewards on its response tokens.

    Reads ``data.batch["response_mask"]`` (B, T) and the non-tensors ``response_text``, ``ground_truth``,
    ``support_docs`` and ``record`` (the rollout's trajectory records: rounds, answer scores, reward positions);
    without ``record``, ``rounds`` and ``search_end_positions``. Returns (token_level_scores (B, T) float32,
    metrics, per-sample TrajectoryScore).
    """
    if "response_mask" not in data.batch:
        raise KeyError(f"compute_token_rewards needs batch['response_mask'] (B, T); batch keys: {sorted(data.batch)}")
    nt = data.non_tensor_batch
    needed = REQUIRED_NON_TENSOR_KEYS + (() if RECORD_KEY in nt else ("rounds", "search_end_positions"))
    missing = [k for k in needed if k not in nt]
    if missing:
        raise KeyError(f"compute_token_rewards needs non-tensors {missing} (or '{RECORD_KEY}' for rounds and "
                       f"positions); present: {sorted(nt)}")
    scores, positions = [], []
    for b in range(len(data)):
        try:
            if RECORD_KEY in nt:
                record = TrajectoryRecord.from_dict(nt[RECORD_KEY][b], f"record of sample {b}")
                scores.append(score_record(record, nt["response_text"][b], nt["ground_truth"][b],
                                           nt["support_docs"][b], cfg))
                positions.append(record.search_end_positions())
            else:
                scores.append(score_trajectory(nt["response_text"][b], nt["rounds"][b], nt["ground_truth"][b],
                                               nt["support_docs"][b], cfg))
                positions.append(_positions(nt["search_end_positions"][b], b))
        except (KeyError, TypeError, ValueError) as err:
            message = err.args[0] if err.args else err                   # KeyError's str() would add quotes
            raise type(err)(f"sample {b}: {message}") from err
    token_level_scores = place_token_rewards(data.batch["response_mask"], [s.step_rewards for s in scores],
                                             positions, [s.overall for s in scores])
    return token_level_scores, reward_metrics(scores), scores


def trajectory_scalar_rewards(token_level_scores: torch.Tensor) -> torch.Tensor:
    """GRPO variant (docs/method.md §1.11): one scalar per trajectory, the sum of its non-zero token rewards. (B, T) -> (B,)."""
    if token_level_scores.dim() != 2:
        raise ValueError(f"token_level_scores must be (B, T), got shape {tuple(token_level_scores.shape)}")
    return token_level_scores.sum(dim=-1)
