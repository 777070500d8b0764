"""The multi-turn search rollout: token-in/token-out, observation masking at append time, recorded positions.

Per turn (docs/method.md §2.3), for every still-active sample:
  1. feed the rolling context (prompt + response so far, left-truncated to `max_prompt_length`) to the engine,
     which stops after `</search>` or `</answer>` and returns the sampled ids (never decoded and re-tokenized);
  2. append those ids with response_mask 1 and parse the first action from their text;
  3. send every search query of the turn to the retriever in ONE batched call;
  4. append the observation (docs / warnings) with response_mask 0, recording the index of the last model
     token of each search turn that produced an `<information>` block (where its step reward goes).
After `max_turns` loop turns, samples still active get a forced final turn whose searches are not executed.

    out = run_rollout(batch, backend, client, tokenizer, AgentConfig(max_turns=5, topk=3))
    out.batch["responses"], out.batch["response_mask"], out.non_tensor_batch["search_end_positions"], ...
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from verl.protocol import DataProto, to_object_array
from verl.trainer.ppo.ray_trainer import FAILED_SAMPLES_KEY
from verl.workers.rollout.base import GenerationOutput, RolloutBackend, SamplingConfig

from stepsearch.agent.actions import Action, parse_action
from stepsearch.agent.config import AgentConfig
from stepsearch.agent.observations import Observation, ObservationEncoder, hits_to_round
from stepsearch.search.client import RetrievalClient, RetrievalError

__all__ = ["run_rollout", "AgentConfig", "RolloutAborted"]

logger = logging.getLogger(__name__)


class RolloutAborted(RuntimeError):
    """Raised with on_retrieval_error="abort" when the retriever fails after the client's retries."""


@dataclass
class Trajectory:
    """One sample's growing response. `response_mask[j]` is 1 for model tokens, 0 for observations."""

    prompt: list[int]
    response: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    search_end_positions: list[int] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    retrieval_errors: list[str] = field(default_factory=list)
    num_turns: int = 0
    num_valid_actions: int = 0
    num_truncated_contexts: int = 0
    finished: bool = False
    done: bool = False

    def context(self, max_len: int) -> list[int]:
        """The rolling context: the last `max_len` tokens of prompt + response (the oldest are dropped)."""
        ids = self.prompt + self.response
        if len(ids) > max_len:
            self.num_truncated_contexts += 1
        return ids[-max_len:]

    def append(self, ids: list[int], is_model: bool, log_probs: list[float] | None = None) -> None:
        self.response.extend(ids)
        self.response_mask.extend([int(is_model)] * len(ids))
        self.log_probs.extend(log_probs if log_probs is not None else [0.0] * len(ids))


@dataclass
class _Timings:
    generate: float = 0.0
    retrieve: float = 0.0


def _prompt_ids(batch: DataProto) -> list[list[int]]:
    """Unpadded prompt ids per row from left-padded `input_ids`/`attention_mask` (B, P)."""
    if "input_ids" not in batch.batch or "attention_mask" not in batch.batch:
        raise KeyError(f"[agent] run_rollout needs batch tensors 'input_ids' and 'attention_mask' (B, P); "
                       f"got {sorted(batch.batch)}")
    input_ids, mask = batch.batch["input_ids"].cpu(), batch.batch["attention_mask"].cpu().bool()
    prompts = [input_ids[i][mask[i]].tolist() for i in range(input_ids.shape[0])]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"[agent] rows {empty[:5]} have an all-zero attention_mask (empty prompt)")
    return prompts


def _sampling(cfg: AgentConfig, turn: int, max_new_tokens: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, stop=cfg.stop, greedy=cfg.greedy, logprobs=cfg.logprobs,
                          seed=None if cfg.seed is None else cfg.seed + turn)


def _generate(active: list[Trajectory], backend: RolloutBackend, cfg: AgentConfig, turn: int,
              timings: _Timings) -> list[GenerationOutput]:
    """One engine call for the active samples; the per-call token limit respects every sample's budget."""
    room = max(cfg.max_response_length - len(t.response) for t in active)
    params = _sampling(cfg, turn, min(cfg.max_new_tokens, room))
    start = time.perf_counter()
    outputs = backend.generate([t.context(cfg.max_prompt_length) for t in active], params)
    timings.generate += time.perf_counter() - start
    if len(outputs) != len(active):
        raise RuntimeError(f"[agent] {type(backend).__name__}.generate returned {len(outputs)} outputs "
                           f"for {len(active)} prompts")
    return outputs


def _record_turn(traj: Trajectory, out: GenerationOutput, tokenizer, cfg: AgentConfig, forced: bool) -> Action:
    """Append the model's ids (mask 1, cut to the response budget) and parse the action they spell."""
    room = cfg.max_response_length - len(traj.response)
    ids = out.token_ids[:room]
    traj.append(ids, is_model=True, log_probs=None if out.log_probs is None else out.log_probs[:room])
    traj.num_turns += 1
    action = parse_action(tokenizer.decode(ids, skip_special_tokens=False))
    if action.kind != "invalid":
        traj.num_valid_actions += 1
    if action.kind == "answer":
        traj.done = traj.finished = True
    elif forced or len(traj.response) >= cfg.max_response_length:
        traj.done = True  # forced turn: searches are not executed; or no budget left for an observation
    return action


def _retrieve(queries: list[str], client: RetrievalClient, cfg: AgentConfig, turn: int,
              timings: _Timings) -> list[list[dict]] | RetrievalError:
    """All of a turn's queries in one batched call; the client's own timeout and retries bound it."""
    start = time.perf_counter()
    try:
        return client.retrieve(queries, topk=cfg.topk)
    except RetrievalError as err:
        if cfg.on_retrieval_error == "abort":
            raise RolloutAborted(f"[agent] retrieval failed at turn {turn} for {len(queries)} queries and "
                                 f"on_retrieval_error='abort': {err}") from err
        logger.warning("[agent] retrieval failed at turn %d for %d queries; error observations: %s",
                       turn, len(queries), err)
        return err
    finally:
        timings.retrieve += time.perf_counter() - start


def _cut_query(action: Action, max_chars: int) -> Action:
    if len(action.content) <= max_chars:
        return action
    return Action(action.kind, action.content[:max_chars].rstrip())


def _step_environment(active: list[Trajectory], actions: list[Action], client: RetrievalClient,
                      encoder: ObservationEncoder, cfg: AgentConfig, turn: int, timings: _Timings) -> None:
    """Observations for the samples still running after this turn: docs, warnings or retrieval errors."""
    last = turn == cfg.max_turns - 1  # the final warning follows a search or an invalid action
    running = [(t, a) for t, a in zip(active, actions) if not t.done]
    caps = {id(t): min(cfg.max_obs_length, cfg.max_response_length - len(t.response)) for t, _ in running}
    overhead = encoder.information_overhead(final_warning=last) + 1
    searchers = [(t, a) for t, a in running if a.kind == "search" and caps[id(t)] >= overhead]
    for t, a in running:
        if a.kind == "search" and caps[id(t)] < overhead:
            t.done = True  # no room left for an <information> block: the episode ends unfinished
    observations: dict[int, Observation] = {}
    if searchers:
        # One over-long query would get the whole batched request a 422: cut it to the server's cap. The content
        # is stripped and non-empty, so a cut query is never blank.
        searchers = [(t, _cut_query(a, cfg.max_query_chars)) for t, a in searchers]
        result = _retrieve([a.content for _, a in searchers], client, cfg, turn, timings)
        if isinstance(result, RetrievalError):
            for t, _ in searchers:
                t.retrieval_errors.append(str(result))
                observations[id(t)] = encoder.retrieval_error(caps[id(t)], final_warning=last)
        else:
            blocks = encoder.information(result, [caps[id(t)] for t, _ in searchers], [last] * len(searchers))
            for (t, a), hits, block in zip(searchers, result, blocks):
                t.search_end_positions.append(len(t.response) - 1)  # last model token of this search turn
                t.rounds.append(hits_to_round(a.content, hits, block.shown_chars))  # docs as shown
                observations[id(t)] = block
    for t, a in running:
        if a.kind == "invalid":
            observations[id(t)] = encoder.invalid_action(caps[id(t)], final_warning=last)
    for t, _ in running:
        if not t.done and id(t) in observations:
            t.append(observations[id(t)].token_ids, is_model=False)
            if len(t.response) >= cfg.max_response_length:
                t.done = True


def _pad_rows(rows: list[list], width: int, fill, dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, :len(row)] = torch.tensor(row, dtype=dtype)
    return out


def _compose(batch: DataProto, trajs: list[Trajectory], tokenizer, cfg: AgentConfig,
             timings: _Timings, wall_s: float) -> DataProto:
    """The output of docs/CONTRACTS.md "Rollout output": (B, T) responses with T = max_response_length."""
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
        "search_end_positions": to_object_array([list(t.search_end_positions) for t in trajs]),
        "rounds": to_object_array([t.rounds for t in trajs]),
        "response_text": to_object_array(tokenizer.batch_decode([t.response for t in trajs],
                                                                skip_special_tokens=False)),
        "num_turns": to_object_array([t.num_turns for t in trajs]),
        "num_searches": to_object_array([len(t.rounds) for t in trajs]),
        "valid_action_ratio": to_object_array([t.num_valid_actions / max(t.num_turns, 1) for t in trajs]),
        "finished": to_object_array([t.finished for t in trajs]),
        "retrieval_errors": to_object_array([list(t.retrieval_errors) for t in trajs]),
    })
    meta = dict(batch.meta_info)
    meta["rollout_metrics"] = _metrics(trajs, response_mask, timings, wall_s)
    # The trainer's failure policy (trainer.max_failed_rollout_share) reads this count of failed trajectories.
    meta[FAILED_SAMPLES_KEY] = sum(1 for t in trajs if t.retrieval_errors)
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=meta)


def _metrics(trajs: list[Trajectory], response_mask: torch.Tensor, timings: _Timings, wall_s: float) -> dict:
    lengths = np.array([len(t.response) for t in trajs], dtype=np.float64)
    model_tokens = response_mask.sum().item()
    per_sample = {"num_searches": [len(t.rounds) for t in trajs], "num_turns": [t.num_turns for t in trajs],
                  "valid_action_ratio": [t.num_valid_actions / max(t.num_turns, 1) for t in trajs],
                  "finished": [float(t.finished) for t in trajs]}
    stats = {}
    for key, values in per_sample.items():  # the only writer of these: the trainer adds no search/* stats
        v = np.asarray(values, dtype=np.float64)
        stats.update({f"search/{key}/mean": float(v.mean()), f"search/{key}/max": float(v.max()),
                      f"search/{key}/min": float(v.min())})
    return {
        **stats,
        # failed retrievals (after the client's retries), and the trajectories that saw at least one
        "search/retrieval_errors": float(sum(len(t.retrieval_errors) for t in trajs)),
        "search/retrieval_failed_trajectories": float(sum(1 for t in trajs if t.retrieval_errors)),
        # turns whose context lost its oldest tokens (possibly the question) to max_prompt_length
        "search/truncated_contexts": float(sum(t.num_truncated_contexts for t in trajs)),
        "search/response_length/mean": float(lengths.mean()),
        "search/obs_token_ratio": float(1.0 - model_tokens / max(lengths.sum(), 1.0)),
        "timing_s/rollout": wall_s,
        "timing_s/rollout_generate": timings.generate,
        "timing_s/rollout_retrieve": timings.retrieve,
        "timing_s/rollout_other": max(wall_s - timings.generate - timings.retrieve, 0.0),
    }


def run_rollout(batch: DataProto, backend: RolloutBackend, client: RetrievalClient, tokenizer,
                cfg: AgentConfig) -> DataProto:
    """Run the search agent on a batch of prompts; returns the batch with the rollout tensors and records.

    batch: `input_ids`, `attention_mask` (B, P), left-padded, plus the dataset's non-tensors (kept).
    Returns the keys of docs/CONTRACTS.md "Rollout output"; meta_info["rollout_metrics"] holds search/* and
    timing_s/* statistics, and meta_info[FAILED_SAMPLES_KEY] the number of trajectories with at least one failed
    retrieval (non-tensor "retrieval_errors" holds each trajectory's error messages).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("[agent] the tokenizer has no pad_token_id; set tokenizer.pad_token")
    start = time.perf_counter()
    trajs = [Trajectory(prompt=p) for p in _prompt_ids(batch)]
    encoder = ObservationEncoder(tokenizer)
    timings = _Timings()
    for turn in range(cfg.max_turns + 1):
        forced = turn == cfg.max_turns  # the forced final turn: no retrieval after it
        active = [t for t in trajs if not t.done]
        if not active:
            break
        outputs = _generate(active, backend, cfg, turn, timings)
        actions = [_record_turn(t, out, tokenizer, cfg, forced) for t, out in zip(active, outputs)]
        if not forced:
            _step_environment(active, actions, client, encoder, cfg, turn, timings)
    return _compose(batch, trajs, tokenizer, cfg, timings, time.perf_counter() - start)
