"""Scoring one trajectory: outcome reward (format gate, r_answer, r_key) and per-round step rewards.

docs/method.md §1.1–1.8:
    r_overall = r_answer + γ_key · r_key       if the format is valid (each term behind its flag)
              = format_fail_score               on a format failure, format_gate="released"
              = 0 + γ_key · r_key               on a format failure, format_gate="paper" (only r_answer is zeroed)
    s_t       = G^t − P^t                       (each term behind its flag)
    step_t    = step_reward_scale · s_t
The "ow sub-answer" row adds sub_answer_coef · r_sub to r_overall (stepsearch/rewards/sub_answer.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .reward_config import RewardConfig
from stepsearch.agent.record import TrajectoryRecord

from .docs import doc_title_text, policy_text, rounds_from_response, support_doc_text
from .info_gain import GoldTfidf, info_gain
from .qa import answer_prediction, answer_scores, as_str_list, check_format, check_format_paper, extract_answer
from .redundancy import redundancy_penalty
from .search_key import search_key_reward
from .sub_answer import extract_sub_answers, sub_answer_reward

__all__ = ["TrajectoryScore", "score_trajectory", "score_record", "reward_metrics", "combine_step_rewards",
           "gold_texts", "round_doc_texts", "round_queries", "format_ok", "outcome_reward", "sparse_token_rewards"]


@dataclass(frozen=True)
class TrajectoryScore:
    answer_f1: float
    answer_em: float
    format_ok: bool
    key_reward: float
    """r_key, computed for logging even when the key reward is off or the format fails."""
    info_gain: list = field(default_factory=list)
    """G^t per round ([] without gold docs)."""
    redundancy: list = field(default_factory=list)
    """P^t per round ([] without gold docs)."""
    step_rewards: list = field(default_factory=list)
    """step_reward_scale · s_t per round, as placed in the token rewards ([] when none are placed)."""
    overall: float = 0.0
    """The outcome reward placed at the last generated token."""
    answer: str | None = None
    """The scored prediction (``qa.answer_prediction`` of the trajectory's answer), None when there is none."""
    sub_answer_reward: float = 0.0
    """r_sub (only computed with use_sub_answer_reward)."""

    def to_dict(self) -> dict:
        return asdict(self)


def gold_texts(support_docs: Sequence[Any] | None) -> list[str]:
    """Body texts of the gold docs (strings or dicts with paragraph_text/text)."""
    if support_docs is None:
        return []
    if hasattr(support_docs, "tolist") and not isinstance(support_docs, (list, tuple)):
        support_docs = support_docs.tolist()
    return [support_doc_text(d, f"support_docs[{i}]") for i, d in enumerate(support_docs)]


def round_doc_texts(rounds: Sequence[Mapping]) -> list[list[str]]:
    """Body texts (no title, docs/method.md §1.6) of each round's docs."""
    out = []
    for t, rnd in enumerate(rounds):
        if not isinstance(rnd, Mapping) or "docs" not in rnd:
            raise KeyError(f"rounds[{t}] must be a dict with 'docs' (and 'query'), got {rnd!r}")
        out.append([doc_title_text(d, f"rounds[{t}].docs[{j}]")[1] for j, d in enumerate(rnd["docs"])])
    return out


def round_queries(rounds: Sequence[Mapping]) -> list[str]:
    """The query of every search round, in order: the policy's own ``<search>`` text as the rollout recorded it
    (never text found inside an observation, which may quote ``<search> and </search>``)."""
    queries = []
    for t, rnd in enumerate(rounds):
        if not isinstance(rnd, Mapping) or not isinstance(rnd.get("query"), str):
            raise KeyError(f"rounds[{t}] must be a dict with a string 'query' (and 'docs'), got {rnd!r}")
        queries.append(rnd["query"])
    return queries


def _targets(ground_truth: Mapping) -> list[str]:
    if not isinstance(ground_truth, Mapping) or "target" not in ground_truth:
        raise KeyError(f"ground_truth must be a dict with 'target' (a list of gold answers), got {ground_truth!r}")
    return as_str_list(ground_truth["target"], "ground_truth.target")


def format_ok(response_text: str, cfg: RewardConfig) -> bool:
    """The format check ``cfg.format_check`` selects: "released" (a closed <answer> at the end of the response) or
    "paper" (also exactly one <answer> and ≥ 1 think+search round, on the policy's own text)."""
    if cfg.format_check == "paper":
        return check_format_paper(policy_text(response_text))
    return check_format(response_text)


def outcome_reward(r_answer: float, key_reward: float, sub_reward: float, is_format_ok: bool,
                   cfg: RewardConfig) -> float:
    """r_overall = r_answer + γ_key·r_key (+ γ_sub·r_sub), each term behind its flag. On a format failure the
    released gate returns format_fail_score; the paper's gate sets only r_answer to 0."""
    bonus = ((cfg.search_key_coef * key_reward if cfg.use_search_key_reward else 0.0)
             + (cfg.sub_answer_coef * sub_reward if cfg.use_sub_answer_reward else 0.0))
    if is_format_ok:
        return r_answer + bonus
    if cfg.format_gate == "paper":
        return 0.0 + bonus                                                  # r_answer = 0, the rest stays
    return cfg.format_fail_score


def combine_step_rewards(gains: list[float], penalties: list[float], cfg: RewardConfig) -> list[float]:
    """step_t = scale · ((G^t if info gain on) − (P^t if penalty on)); [] when step rewards are off."""
    if not cfg.use_step_rewards:
        return []
    return [cfg.step_reward_scale * ((g if cfg.use_info_gain else 0.0) - (p if cfg.use_redundancy_penalty else 0.0))
            for g, p in zip(gains, penalties)]


def score_trajectory(response_text: str, rounds: Sequence[Mapping] | None, ground_truth: Mapping,
                     support_docs: Sequence[Any] | None, cfg: RewardConfig) -> TrajectoryScore:
    """Score a trajectory that has no record (saved files of older runs, hand-written rows). ``response_text`` is
    the response only (never the prompt). ``rounds`` are ``[{"query", "docs": [{"id","title","text"}]}]`` (docs as
    shown to the policy); None parses them from the response's ``<information>`` blocks. The prediction is
    ``qa.answer_prediction`` of the last ``<answer>`` of the text. Rollouts carry a record: use
    :func:`score_record`."""
    if not isinstance(response_text, str):
        raise TypeError(f"response_text must be a string, got {type(response_text).__name__}")
    if rounds is None:
        rounds = rounds_from_response(response_text)
    prediction = answer_prediction(extract_answer(response_text))
    em, f1 = answer_scores(prediction, _targets(ground_truth))
    return _score(response_text, rounds, prediction, em, f1, ground_truth, support_docs, cfg)


def score_record(record: TrajectoryRecord | Mapping, response_text: str, ground_truth: Mapping,
                 support_docs: Sequence[Any] | None, cfg: RewardConfig) -> TrajectoryScore:
    """Score a trajectory from its rollout record: its rounds (queries as sent, docs as shown), its answer and the
    answer EM/F1 the rollout computed once (computed here only when the rollout had no targets). The text is read
    only by the format gate and the sub-answer reward, which are about the text itself."""
    if not isinstance(response_text, str):
        raise TypeError(f"response_text must be a string, got {type(response_text).__name__}")
    record = TrajectoryRecord.from_dict(record)
    targets = _targets(ground_truth)
    if record.answer_em is None or record.answer_f1 is None:
        em, f1 = answer_scores(record.prediction, targets)
    else:
        em, f1 = float(record.answer_em), float(record.answer_f1)
    return _score(response_text, record.rounds(), record.prediction, em, f1, ground_truth, support_docs, cfg)


def _score(response_text: str, rounds: Sequence[Mapping], prediction: str | None, answer_em: float,
           answer_f1: float, ground_truth: Mapping, support_docs: Sequence[Any] | None,
           cfg: RewardConfig) -> TrajectoryScore:
    """The reward terms of docs/method.md §1 from the answer scores and the rounds. Without gold docs, G and P are
    empty and no step rewards are produced (§1.6)."""
    is_format_ok = format_ok(response_text, cfg)
    key_reward = search_key_reward(round_queries(rounds), ground_truth.get("search_keys"), cfg.key_reward_mode)
    sub_reward = (sub_answer_reward(extract_sub_answers(policy_text(response_text)), ground_truth.get("sub_answers"))
                  if cfg.use_sub_answer_reward else 0.0)
    golds = gold_texts(support_docs)
    gains, penalties = [], []
    if golds:
        gains = info_gain(round_doc_texts(rounds), GoldTfidf(golds))
        penalties = redundancy_penalty([rnd["docs"] for rnd in rounds])
    r_answer = answer_f1 if cfg.answer_metric == "f1" else answer_em
    overall = outcome_reward(r_answer, key_reward, sub_reward, is_format_ok, cfg)
    keep_steps = is_format_ok or cfg.format_gate == "paper" or cfg.step_rewards_on_format_fail
    steps = combine_step_rewards(gains, penalties, cfg) if keep_steps else []
    return TrajectoryScore(answer_f1=answer_f1, answer_em=answer_em, format_ok=is_format_ok, key_reward=key_reward,
                           info_gain=gains, redundancy=penalties, step_rewards=steps, overall=float(overall),
                           answer=prediction, sub_answer_reward=sub_reward)


def sparse_token_rewards(step_rewards: Sequence[float], step_positions: Sequence[int], last_position: int | None,
                         overall: float) -> dict[int, float]:
    """The token rewards of one trajectory as {response index: value} (docs/method.md §1.8): step_rewards[t] at
    step_positions[t] (the first min(len, len) pairs), then the outcome ASSIGNED (not added) at
    ``last_position``, the last generated token (nothing when None). Every other token gets 0."""
    out = {int(p): float(r) for r, p in zip(step_rewards, step_positions)}
    if last_position is not None:
        out[int(last_position)] = float(overall)
    return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def reward_metrics(scores: Sequence[TrajectoryScore]) -> dict[str, float]:
    """Batch means. Per-trajectory keys average over samples; info_gain, redundancy and step_reward average over
    all search rounds of the batch that have a value (0.0 when there is none)."""
    return {
        "reward/answer_f1/mean": _mean([s.answer_f1 for s in scores]),
        "reward/answer_em/mean": _mean([s.answer_em for s in scores]),
        "reward/format_ok/mean": _mean([float(s.format_ok) for s in scores]),
        "reward/key_reward/mean": _mean([s.key_reward for s in scores]),
        "reward/info_gain/mean": _mean([g for s in scores for g in s.info_gain]),
        "reward/redundancy/mean": _mean([p for s in scores for p in s.redundancy]),
        "reward/step_reward/mean": _mean([r for s in scores for r in s.step_rewards]),
        "reward/overall/mean": _mean([s.overall for s in scores]),
    }
