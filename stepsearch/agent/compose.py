"""From finished trajectories to the rollout output DataProto (docs/CONTRACTS.md "Rollout output"), shared by the
sync and the async loop: padded (B, T) tensors, the per-trajectory records and the views derived from them,
and the search/* and timing_s/rollout_* metrics."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from verl.hooks import FAILED_SAMPLES_KEY
from verl.protocol import DataProto, to_object_array

from stepsearch.agent.agent_config import AgentConfig
from stepsearch.agent.record import TrajectoryRecord
from stepsearch.agent.trajectory import Trajectory, finish_record, targets_of

__all__ = ["RolloutTimings", "prompt_ids_of", "row_targets", "compose_output"]


@dataclass
class RolloutTimings:
    """Wall seconds during which the engine (generate) and the retriever (retrieve) had work. The sync loop
    waits for one or the other; in the async loop they overlap, and each is the union of its busy intervals."""
    generate: float = 0.0
    retrieve: float = 0.0
    either: float | None = None
    """Async: the union of both (engine or retriever busy); None: generate + retrieve (they never overlap)."""
    engine_busy_fraction: float | None = None
    """Async: share of the wall time with at least one request in an engine."""


def prompt_ids_of(batch: DataProto) -> list[list[int]]:
    """Unpadded prompt ids per row from left-padded `input_ids`/`attention_mask` (B, P)."""
    if "input_ids" not in batch.batch or "attention_mask" not in batch.batch:
        raise KeyError(f"[agent] the rollout needs batch tensors 'input_ids' and 'attention_mask' (B, P); "
                       f"got {sorted(batch.batch)}")
    input_ids, mask = batch.batch["input_ids"].cpu(), batch.batch["attention_mask"].cpu().bool()
    prompts = [input_ids[i][mask[i]].tolist() for i in range(input_ids.shape[0])]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"[agent] rows {empty[:5]} have an all-zero attention_mask (empty prompt)")
    return prompts


def row_targets(batch: DataProto) -> list[list[str] | None]:
    """Per row, the gold answers of its ``ground_truth`` non-tensor (None where the batch has none)."""
    gts = batch.non_tensor_batch.get("ground_truth")
    if gts is None:
        return [None] * len(batch)
    return [targets_of(gt, f"row {i}") for i, gt in enumerate(gts)]


def _pad_rows(rows: list[list], width: int, fill, dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, :len(row)] = torch.tensor(row, dtype=dtype)
    return out


def compose_output(batch: DataProto, trajs: list[Trajectory], tokenizer, cfg: AgentConfig, timings: RolloutTimings,
                   wall_s: float, records: list[TrajectoryRecord] | None = None) -> DataProto:
    """The rollout output: (B, T) tensors with T = max_response_length, the non-tensor ``record`` (one
    ``TrajectoryRecord.to_dict()`` per row) and the views derived from it (search_end_positions, rounds, ...).

    records: already finished records (the async loop finishes each trajectory as it ends); None finishes them
    here with the batch's targets.
    """
    if records is None:
        records = [finish_record(t, targets) for t, targets in zip(trajs, row_targets(batch))]
    T = cfg.max_response_length
    prompts = batch.batch["input_ids"].cpu().long()  # (B, P), left-padded
    prompt_mask = batch.batch["attention_mask"].cpu().long()
    responses = _pad_rows([t.response for t in trajs], T, tokenizer.pad_token_id, torch.long)  # (B, T)
    response_attn = _pad_rows([[1] * len(t.response) for t in trajs], T, 0, torch.long)
    response_mask = _pad_rows([t.response_mask for t in trajs], T, 0, torch.long)
    attention_mask = torch.cat([prompt_mask, response_attn], dim=1)  # (B, L)
    tensors = {
        "prompts": prompts, "responses": responses, "response_mask": response_mask,
        "input_ids": torch.cat([prompts, responses], dim=1), "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0),
    }
    if cfg.logprobs:
        log_probs = _pad_rows([t.log_probs for t in trajs], T, 0.0, torch.float32)
        tensors["rollout_log_probs"] = log_probs * response_mask  # 0 on observations and pad
    non_tensors = dict(batch.non_tensor_batch)
    non_tensors.update({
        "record": to_object_array([r.to_dict() for r in records]),
        "search_end_positions": to_object_array([r.search_end_positions() for r in records]),
        "rounds": to_object_array([r.rounds() for r in records]),
        "response_text": to_object_array(tokenizer.batch_decode([t.response for t in trajs],
                                                                skip_special_tokens=False)),
        "num_turns": to_object_array([len(r.turns) for r in records]),
        "num_searches": to_object_array([r.num_searches for r in records]),
        "valid_action_ratio": to_object_array([r.num_valid_actions / max(len(r.turns), 1) for r in records]),
        "finished": to_object_array([r.finished for r in records]),
        "retrieval_errors": to_object_array([r.retrieval_errors() for r in records]),
        "rollout_timing": to_object_array([dict(t.timing) for t in trajs]),
    })
    meta = dict(batch.meta_info)
    meta["rollout_metrics"] = _metrics(records, response_mask, timings, wall_s)
    # The trainer's failure policy (trainer.max_failed_rollout_share) reads this count of failed trajectories.
    meta[FAILED_SAMPLES_KEY] = sum(1 for r in records if r.retrieval_errors())
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=meta)


def _metrics(records: list[TrajectoryRecord], response_mask: torch.Tensor, timings: RolloutTimings,
             wall_s: float) -> dict:
    lengths = np.array([r.response_length for r in records], dtype=np.float64)
    model_tokens = response_mask.sum().item()
    per_sample = {"num_searches": [r.num_searches for r in records], "num_turns": [len(r.turns) for r in records],
                  "valid_action_ratio": [r.num_valid_actions / max(len(r.turns), 1) for r in records],
                  "finished": [float(r.finished) for r in records]}
    stats = {}
    for key, values in per_sample.items():  # the only writer of these: the trainer adds no search/* stats
        v = np.asarray(values, dtype=np.float64)
        stats.update({f"search/{key}/mean": float(v.mean()), f"search/{key}/max": float(v.max()),
                      f"search/{key}/min": float(v.min())})
    errors = [r.retrieval_errors() for r in records]
    out = {
        **stats,
        # failed retrievals (after the client's retries), and the trajectories that saw at least one
        "search/retrieval_errors": float(sum(len(e) for e in errors)),
        "search/retrieval_failed_trajectories": float(sum(1 for e in errors if e)),
        # turns whose context lost its oldest tokens (possibly the question) to max_context_length
        "search/truncated_contexts": float(sum(r.truncated_contexts for r in records)),
        "search/response_length/mean": float(lengths.mean()),
        "search/obs_token_ratio": float(1.0 - model_tokens / max(lengths.sum(), 1.0)),
        "timing_s/rollout": wall_s,
        "timing_s/rollout_generate": timings.generate,
        "timing_s/rollout_retrieve": timings.retrieve,
        "timing_s/rollout_other": max(wall_s - (timings.generate + timings.retrieve if timings.either is None
                                                 else timings.either), 0.0),
    }
    if timings.engine_busy_fraction is not None:
        out["rollout/engine_busy_fraction"] = timings.engine_busy_fraction
    return out
