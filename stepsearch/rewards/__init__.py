"""StepSearch rewards (docs/method.md §1): answer F1 with a format gate, search-key reward, information gain and
redundancy penalty, placed on response tokens. See docs/rewards.md.

The token-level functions need torch and are imported on first use, so the scoring CLI starts without it.
"""
from .reward_config import ABLATIONS, RewardConfig
from .docs import format_docs, parse_information_blocks, policy_text, rounds_from_response
from .info_gain import GoldTfidf, info_gain, info_gain_from_similarities
from .qa import (answer_prediction, answer_scores, check_format, check_format_paper, cover_exact_match, exact_match,
                 extract_answer, extract_eval_prediction, extract_queries, f1_score, normalize_answer)
from .redundancy import redundancy_penalty
from .trajectory_score import TrajectoryScore, reward_metrics, score_record, score_trajectory, sparse_token_rewards
from .search_key import search_key_reward
from .sub_answer import sub_answer_reward

_TOKEN_LEVEL = ("compute_token_rewards", "place_token_rewards", "trajectory_scalar_rewards")

__all__ = [
    "ABLATIONS", "RewardConfig", "format_docs", "parse_information_blocks", "rounds_from_response", "GoldTfidf",
    "info_gain", "info_gain_from_similarities", "check_format", "check_format_paper", "policy_text",
    "sub_answer_reward", "cover_exact_match", "exact_match", "extract_answer", "answer_prediction", "answer_scores",
    "extract_eval_prediction", "extract_queries", "f1_score", "normalize_answer", "redundancy_penalty",
    "TrajectoryScore", "score_trajectory", "score_record", "sparse_token_rewards", "search_key_reward",
    "reward_metrics", *_TOKEN_LEVEL,
]


def __getattr__(name):
    if name in _TOKEN_LEVEL:
        from . import token_rewards
        return getattr(token_rewards, name)
    raise AttributeError(f"module 'stepsearch.rewards' has no attribute '{name}'")
