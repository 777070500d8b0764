"""The search task's row adapter (``verl.hooks.RowAdapter``): a seed-format row's non-tensors for the agent and rewards.

The trainer gets it through ``trainer.row_adapter: stepsearch.train.build_row_adapter``; the eval harness, the warm
start and the tests pass ``search_row_fields`` to ``RLHFDataset(row_adapter=...)`` directly. The row format is
docs/CONTRACTS.md "Dataset rows".
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["search_row_fields", "SEARCH_ROW_KEYS"]

SEARCH_ROW_KEYS = ("ground_truth", "support_docs", "question")
"""What ``search_row_fields`` returns for every row."""


def _require(columns: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in columns or columns[key] is None:
        raise KeyError(f"[data] {where}: row has no '{key}' field (keys: {sorted(columns)}); "
                       f"see docs/CONTRACTS.md 'Dataset rows'")
    return columns[key]


def search_row_fields(columns: Mapping[str, Any], messages: list[dict], where: str) -> dict:
    """``ground_truth`` (``reward_model.ground_truth`` with ``search_keys`` and ``sub_answers`` defaulting to [];
    rows written before ``sub_answers`` existed hold none), ``support_docs`` (``extra_info.support_docs``, [] when
    absent) and ``question`` (the last prompt message's text)."""
    reward_model = _require(columns, "reward_model", where)
    ground_truth = dict(_require(reward_model, "ground_truth", where + " reward_model"))
    ground_truth.setdefault("search_keys", [])
    if ground_truth.get("sub_answers") is None:
        ground_truth["sub_answers"] = []
    extra = columns.get("extra_info") or {}
    return {"ground_truth": ground_truth, "support_docs": list(extra.get("support_docs") or []),
            "question": messages[-1]["content"]}
