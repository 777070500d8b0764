"""Token-budget micro-batches (``use_dynamic_bsz``): rows grouped by their real-token counts, not by a row count.

Letters: B rows.
"""
from __future__ import annotations

import torch

__all__ = ["token_budget_groups"]


def token_budget_groups(lengths: torch.Tensor, max_tokens: int) -> list[list[int]]:
    """Row indices grouped so that each group's Σ lengths ≤ max_tokens, in few groups (first-fit decreasing).

    lengths: (B,) real tokens per row (Σ attention_mask). Groups are ordered by their first (longest) row; the
    indices inside a group are ascending. Deterministic: ties keep the row order. Raises ValueError when one row
    alone exceeds the budget.
    """
    if max_tokens <= 0:
        raise ValueError(f"token_budget_groups: max_tokens must be > 0, got {max_tokens}")
    lens = [int(n) for n in lengths.tolist()]
    if lens and max(lens) > max_tokens:
        row = lens.index(max(lens))
        raise ValueError(f"row {row} has {lens[row]} tokens, more than the micro-batch token budget {max_tokens}; "
                         f"raise ppo_max_token_len_per_gpu / forward_max_token_len_per_gpu")
    order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for g, free in enumerate(room):
            if lens[i] <= free:
                groups[g].append(i)
                room[g] -= lens[i]
                break
        else:
            groups.append([i])
            room.append(max_tokens - lens[i])
    return [sorted(g) for g in groups]
