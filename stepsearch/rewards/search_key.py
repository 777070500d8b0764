"""Search-key reward r_key (docs/method.md §1.4; arXiv 2505.15107, the search-key reward of the global reward).

Both modes score a query against a gold key with the answer F1 (normalization, 4-decimal rounding).
"""
from __future__ import annotations

from .qa import as_str_list, f1_score

__all__ = ["KEY_REWARD_MODES", "search_key_reward", "key_reward_max", "key_reward_latest", "as_key_groups"]


def as_key_groups(search_keys) -> list[list[str]]:
    """``ground_truth.search_keys`` as a list of groups (one per sub-question), each a list of alternative keys."""
    if search_keys is None:
        return []
    if hasattr(search_keys, "tolist") and not isinstance(search_keys, (list, tuple)):
        search_keys = list(search_keys)
    if isinstance(search_keys, str) or not isinstance(search_keys, (list, tuple)):
        raise TypeError(f"ground_truth.search_keys must be a list of lists of strings, got {search_keys!r}")
    return [as_str_list(group, f"ground_truth.search_keys[{i}]") for i, group in enumerate(search_keys)]


def _group_scores(query: str, groups: list[list[str]]) -> list[float]:
    """s_i = max_j F1(q, k_ij) for every group i."""
    return [f1_score(query, group) for group in groups]


def key_reward_max(queries: list[str], groups: list[list[str]]) -> float:
    """Paper formula: r_key = (1/M) Σ_{i=1..M} max_{j≤N_i} max_{t≤T} F1(q_t, k_ij)."""
    if not queries or not groups:
        return 0.0
    best = [0.0] * len(groups)
    for q in queries:
        best = [max(b, s) for b, s in zip(best, _group_scores(q, groups))]
    return sum(best) / len(groups)


def key_reward_latest(queries: list[str], groups: list[list[str]]) -> float:
    """Released algorithm (docs/method.md §1.4 steps 1–4): each query goes to its single best group i* (strictly greater
    comparison, so ties go to the lowest index; groups with s_i = 0 are never chosen) and OVERWRITES that group's
    score, so a later, worse query matched to the same group lowers it. r_key = Σ_i score[i] / M."""
    if not queries or not groups:
        return 0.0
    score = [0.0] * len(groups)
    for q in queries:
        best_i, best_s = None, 0.0
        for i, s in enumerate(_group_scores(q, groups)):
            if s > best_s:
                best_i, best_s = i, s
        if best_i is not None:
            score[best_i] = best_s
    return sum(score) / len(groups)


KEY_REWARD_MODES = {"max": key_reward_max, "latest": key_reward_latest}


def search_key_reward(queries: list[str], search_keys, mode: str = "max") -> float:
    """r_key for one trajectory. ``queries``: every ``<search>`` span of the response; ``search_keys``: the gold
    key groups (list of lists). ``mode``: "max" (paper) or "latest" (released)."""
    if mode not in KEY_REWARD_MODES:
        raise ValueError(f"key_reward_mode '{mode}' is unknown; valid modes: {sorted(KEY_REWARD_MODES)}")
    return KEY_REWARD_MODES[mode](queries, as_key_groups(search_keys))
