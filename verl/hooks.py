"""The task interface: the hooks a task implements to train with this engine, and the types they exchange.

The engine knows no task. A task plugs in through three factories named by dotted path in the ``trainer`` config
section; each is called once as ``factory(config: dict, tokenizer)`` and returns its hook:

    trainer.row_adapter -> RowAdapter  one dataset row -> the task's non-tensor fields of that sample
                                       (empty: ``passthrough_row_fields``, every column kept as an opaque object)
    trainer.rollout_fn  -> RolloutFn   a prompt batch -> a trajectory batch (the task's environment loop)
    trainer.reward_fn   -> RewardFn    a trajectory batch -> RewardResult (token scores, metrics, per-sample scores)

What a task may import from ``verl`` is this module, ``verl.protocol`` (DataProto), ``verl.workers.rollout`` (the
engines a rollout drives) and a few generic utilities; ``.importlinter`` at the repository root lists them and
``lint-imports`` (run by ``make test``) enforces it. ``verl`` itself never imports a task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

from verl.protocol import DataProto

__all__ = ["RowAdapter", "RolloutFn", "RewardFn", "RewardResult", "ENGINE_ROW_KEYS", "FAILED_SAMPLES_KEY",
           "passthrough_row_fields"]

ENGINE_ROW_KEYS = ("data_source", "index", "id")
"""Non-tensors the dataset itself sets on every sample (a row adapter must not return them): ``data_source`` (the
row's column; validation averages per source), ``index`` (int: ``extra_info.index``, else the row's position; the
group id of GRPO-style estimators and the resume trace) and ``id`` (str: the row's ``id``, else
``{data_source}_{index}``)."""

FAILED_SAMPLES_KEY = "failed_samples"
"""meta_info key of a rollout hook's output: how many of its rows met an environment failure (a tool or service
the rollout calls failed for that row). The trainer logs it as ``rollout/failed_samples`` and aborts the step when
the share exceeds ``trainer.max_failed_rollout_share``; a hook that never fails may omit it."""


class RowAdapter(Protocol):
    """``adapter(columns, messages, where) -> dict``: the task's non-tensor fields of one dataset row.

    columns: the row's parquet columns except the prompt column; messages: the prompt as a list of
    ``{role, content}`` dicts (a plain-string prompt becomes one user message); where: ``file:row`` for error
    messages. The returned values become object-array non-tensors of the batch; every row must return the same
    keys, none of them in ``ENGINE_ROW_KEYS``."""
    def __call__(self, columns: Mapping[str, Any], messages: list[dict], where: str) -> dict: ...


def passthrough_row_fields(columns: Mapping[str, Any], messages: list[dict], where: str) -> dict:
    """The default row adapter: every column other than the prompt and ``ENGINE_ROW_KEYS``, as it is."""
    return {k: v for k, v in columns.items() if k not in ENGINE_ROW_KEYS}


class RolloutFn(Protocol):
    """``rollout(batch, backend, validate) -> DataProto``: the trajectories of a prompt batch.

    batch: ``input_ids``/``attention_mask`` (B, P) left-padded plus the row non-tensors; backend: a
    ``verl.workers.rollout.base.RolloutBackend``; validate: True on validation batches (decode greedily). The output
    holds ``prompts`` (B, P), ``responses``/``response_mask`` (B, T), ``input_ids``/``attention_mask``/
    ``position_ids`` (B, P + T); its ``meta_info`` may hold ``rollout_metrics`` (dict[str, float], logged as is)
    and ``FAILED_SAMPLES_KEY``. Optional attribute ``console_metrics: tuple[str, ...]``: metric keys the console
    line shows after the engine's own."""
    def __call__(self, batch: DataProto, backend: Any, validate: bool) -> DataProto: ...


@dataclass
class RewardResult:
    """What a reward hook returns for a rollout batch of B trajectories."""
    token_level_scores: torch.Tensor
    """(B, T) float32: the scores on response tokens (the trainer adds the KL penalty, if any, to these)."""
    metrics: dict
    """Batch-level reward metrics, logged as they are."""
    per_sample: list
    """B dicts: each validation sample's row of ``predictions/step_N.jsonl`` (after the trainer's ``id`` and
    ``data_source``) and its scores."""
    score_keys: tuple[str, ...] | None = None
    """Keys of ``per_sample`` that validation averages per data_source into ``val/{source}/{key}`` (and
    ``val/all/{key}``); None: every int or float value (bools excluded)."""


class RewardFn(Protocol):
    """``reward(batch) -> RewardResult``. Optional attributes: ``prediction_records(batch, result) -> list[dict]``
    (one dict per row; validation merges those fields into the ``predictions/step_N.jsonl`` rows, the
    trainer's own fields winning, so a task can dump rows in its own evaluation format; called on validation
    batches only) and ``console_metrics: tuple[str, ...]`` (as ``RolloutFn``'s)."""
    def __call__(self, batch: DataProto) -> RewardResult: ...
