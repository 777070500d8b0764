"""The synchronous multi-turn search rollout (agent.mode: sync): turn by turn for the whole batch.

Per turn (docs/method.md §2.3), for every still-active sample:
  1. feed the rolling context (prompt + response so far, left-truncated to `max_context_length`) to the engine,
     which stops after `</search>` or `</answer>` and returns the sampled ids (never decoded and re-tokenized);
  2. append those ids with response_mask 1 and parse the first action from their text;
  3. send every search query of the turn to the retriever in ONE batched call;
  4. append the observation (docs / warnings) with response_mask 0; the trajectory record notes each turn's
     span, action, the docs as shown and the observation's span (stepsearch.agent.record).
After `max_turns` loop turns, samples still active get a forced final turn whose searches are not executed.
The per-trajectory steps live in `trajectory.py` and are shared with the async loop (`async_loop.py`).

    out = run_rollout(batch, backend, client, tokenizer, AgentConfig(max_turns=5, topk=3))
    out.batch["responses"], out.batch["response_mask"], out.non_tensor_batch["record"], ...
"""
from __future__ import annotations

import time

from verl.protocol import DataProto
from verl.workers.rollout.base import GenerationOutput, RolloutBackend

from stepsearch.agent.actions import Action
from stepsearch.agent.compose import RolloutTimings, compose_output, prompt_ids_of
from stepsearch.agent.agent_config import AgentConfig
from stepsearch.agent.observations import ObservationEncoder
from stepsearch.agent.trajectory import (RolloutAborted, SearchRequest, Trajectory, check_retrieval_error,
                                         observe_information, observe_retrieval_error, plan_observation, record_turn,
                                         request_seed, sampling_config)
from stepsearch.search.client import RetrievalClient, RetrievalError

__all__ = ["run_rollout", "AgentConfig", "RolloutAborted"]


def _generate(active: list[Trajectory], rows: list[int], backend: RolloutBackend, cfg: AgentConfig, turn: int,
              timings: RolloutTimings) -> list[GenerationOutput]:
    """One engine call for the active samples (batch rows `rows`); the per-call token limit respects every sample's
    budget. Each row samples from its own `request_seed` (the async loop's); an engine with one RNG per call (HF)
    uses the call seed cfg.seed + turn."""
    room = max(t.room(cfg) for t in active)
    row_seeds = None if cfg.seed is None else tuple(request_seed(cfg, row, turn) for row in rows)
    params = sampling_config(cfg, min(cfg.max_new_tokens, room), None if cfg.seed is None else cfg.seed + turn,
                             row_seeds)
    start = time.perf_counter()
    outputs = backend.generate([t.context(cfg.max_context_length) for t in active], params)
    elapsed = time.perf_counter() - start
    timings.generate += elapsed
    for t in active:
        t.timing["generate_s"] += elapsed
    if len(outputs) != len(active):
        raise RuntimeError(f"[agent] {type(backend).__name__}.generate returned {len(outputs)} outputs "
                           f"for {len(active)} prompts")
    return outputs


def _retrieve(queries: list[str], client: RetrievalClient, cfg: AgentConfig, turn: int,
              timings: RolloutTimings) -> list[list[dict]] | RetrievalError:
    """All of a turn's queries in one batched call; the client's own timeout and retries bound it."""
    start = time.perf_counter()
    try:
        return client.retrieve(queries, topk=cfg.topk)
    except RetrievalError as err:
        check_retrieval_error(err, cfg, f"at turn {turn} for {len(queries)} queries")
        return err
    finally:
        timings.retrieve += time.perf_counter() - start


def _step_environment(active: list[Trajectory], actions: list[Action], client: RetrievalClient,
                      encoder: ObservationEncoder, cfg: AgentConfig, turn: int, timings: RolloutTimings) -> None:
    """Observations for the samples still running after this turn: warnings at once, then every search of the
    turn in one retrieval call, and their <information> blocks tokenized in one call."""
    searches: list[tuple[Trajectory, SearchRequest]] = []
    for traj, action in zip(active, actions):
        request = plan_observation(traj, action, encoder, cfg, turn)
        if request is not None:
            searches.append((traj, request))
    if not searches:
        return
    before = timings.retrieve
    result = _retrieve([r.query for _, r in searches], client, cfg, turn, timings)
    for traj, _ in searches:
        traj.timing["retrieve_s"] += timings.retrieve - before
    if isinstance(result, RetrievalError):
        for traj, request in searches:
            observe_retrieval_error(traj, request, result, encoder, cfg)
        return
    blocks = encoder.information(result, [r.cap for _, r in searches], [r.final_warning for _, r in searches])
    for (traj, request), hits, block in zip(searches, result, blocks):
        observe_information(traj, request, hits, block, cfg)


def run_rollout(batch: DataProto, backend: RolloutBackend, client: RetrievalClient, tokenizer,
                cfg: AgentConfig) -> DataProto:
    """Run the search agent on a batch of prompts; returns the batch with the rollout tensors and records.

    batch: `input_ids`, `attention_mask` (B, P), left-padded, plus the dataset's non-tensors (kept; a
    `ground_truth` dict with `target` lets each trajectory record its answer EM/F1).
    Returns the keys of docs/CONTRACTS.md "Rollout output" plus the non-tensor `record`;
    meta_info["rollout_metrics"] holds search/* and timing_s/* statistics, and meta_info[FAILED_SAMPLES_KEY] the
    number of trajectories with at least one failed retrieval.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("[agent] the tokenizer has no pad_token_id; set tokenizer.pad_token")
    start = time.perf_counter()
    trajs = [Trajectory(prompt=p) for p in prompt_ids_of(batch)]
    encoder = ObservationEncoder(tokenizer)
    timings = RolloutTimings()
    for turn in range(cfg.max_turns + 1):
        forced = turn == cfg.max_turns  # the forced final turn: no retrieval after it
        rows = [i for i, t in enumerate(trajs) if not t.done]
        if not rows:
            break
        active = [trajs[i] for i in rows]
        outputs = _generate(active, rows, backend, cfg, turn, timings)
        actions = [record_turn(t, out, tokenizer, cfg, forced) for t, out in zip(active, outputs)]
        if not forced:
            _step_environment(active, actions, client, encoder, cfg, turn, timings)
        for t in active:
            if t.done or forced:
                t.timing.setdefault("end_s", time.perf_counter() - start)
    return compose_output(batch, trajs, tokenizer, cfg, timings, time.perf_counter() - start)
