"""The asynchronous multi-turn search rollout (agent.mode: async): every trajectory runs its own turn loop.

A trajectory sends its turn to the engine as soon as its previous observation is appended, and its search to the
retriever as soon as it writes `</search>`; nobody waits for the slowest member of a batch. The engine batches
whatever is in flight (vLLM's AsyncLLM continuously; a batch backend through `BatchingEngine`), and the
retriever's own batcher coalesces the single-query requests that arrive together.

    one trajectory (row i):
      prompt ─> [engine: turn 0, own seed] ─> search? ─> [retriever: 1 query] ─> <information> ─> [engine: turn 1]
                                            answer? ─> done    invalid? ─> warning ─> [engine: next turn]
    other rows run the same loop at the same time; at most `max_concurrent_trajectories` at once.

Masks, `search_end_positions`, observation caps, the final warning and the forced final turn are the sync loop's,
through the same per-trajectory steps (`trajectory.py`). Turn s of row i samples with seed
`trajectory.request_seed` = `cfg.seed + i·(max_turns+1) + s` (the sync loop's too), so with an engine that seeds each
request (AsyncVLLMEngine, vLLM) the batch is the same whatever order the trajectories finish in, and the same as
the sync loop's. A failed retrieval gives that trajectory the sync loop's error
observation after the client's own retries; the others are not held up.

    out = run_rollout_async(batch, engine, client, tokenizer, AgentConfig(mode="async", seed=0))
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Sequence

from verl.protocol import DataProto
from verl.workers.rollout.async_engine import AsyncRolloutEngine, BatchingEngine, EnginePool, run_sync
from verl.workers.rollout.base import RolloutBackend

from stepsearch.agent.compose import RolloutTimings, compose_output, prompt_ids_of, row_targets
from stepsearch.agent.agent_config import AgentConfig
from stepsearch.agent.observations import ObservationEncoder
from stepsearch.agent.record import TrajectoryRecord
from stepsearch.agent.retrieval_session import RetrievalSession, open_retrieval_session
from stepsearch.agent.trajectory import (RolloutAborted, SearchRequest, Trajectory, check_retrieval_error,
                                         finish_record, observe_information, observe_retrieval_error,
                                         plan_observation, record_turn, request_seed, sampling_config)
from stepsearch.search.client import RetrievalClient, RetrievalError

__all__ = ["run_rollout_async", "arun_rollout", "as_async_engine", "request_seed", "RolloutAborted"]


def as_async_engine(engine) -> AsyncRolloutEngine:
    """An AsyncRolloutEngine from an engine, a batch RolloutBackend (wrapped in BatchingEngine; one per replica
    in an EnginePool when `backend.replicas()` has several, e.g. the trainer's data-parallel ranks) or a list of
    either (an EnginePool: each request to the least-busy one)."""
    if isinstance(engine, AsyncRolloutEngine):
        return engine
    if isinstance(engine, RolloutBackend):
        replicas = engine.replicas()
        return BatchingEngine(engine) if len(replicas) <= 1 else EnginePool([BatchingEngine(r) for r in replicas])
    if isinstance(engine, (list, tuple)):
        engines = [as_async_engine(e) for e in engine]
        return engines[0] if len(engines) == 1 else EnginePool(engines)
    raise TypeError(f"[agent] the async rollout needs an AsyncRolloutEngine, a RolloutBackend or a list of them, "
                    f"got {type(engine).__name__}")


def _union_s(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (seconds)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


@dataclass
class _Shared:
    """What every trajectory task of one rollout uses."""
    engine: AsyncRolloutEngine
    retriever: RetrievalSession
    tokenizer: object
    encoder: ObservationEncoder
    cfg: AgentConfig
    start: float
    generating: list[tuple[float, float]] = field(default_factory=list)
    retrieving: list[tuple[float, float]] = field(default_factory=list)


async def _search(traj: Trajectory, request: SearchRequest, ctx: _Shared, turn: int) -> None:
    """One query to the retriever (its own request; the server coalesces concurrent ones), then its observation."""
    start = time.perf_counter()
    try:
        hits = await ctx.retriever.retrieve_one(request.query, topk=ctx.cfg.topk)
    except RetrievalError as err:
        check_retrieval_error(err, ctx.cfg, f"at turn {turn} for query {request.query[:80]!r}")
        observe_retrieval_error(traj, request, err, ctx.encoder, ctx.cfg)
        return
    finally:
        end = time.perf_counter()
        ctx.retrieving.append((start, end))
        traj.timing["retrieve_s"] += end - start
    [block] = ctx.encoder.information([hits], [request.cap], [request.final_warning])
    observe_information(traj, request, hits, block, ctx.cfg)


async def _run_trajectory(row: int, traj: Trajectory, targets: list[str] | None, ctx: _Shared) -> TrajectoryRecord:
    """The turn loop of one trajectory: generate, record, observe, until it answers, runs out of budget or has
    had its forced final turn."""
    cfg = ctx.cfg
    for turn in range(cfg.max_turns + 1):
        forced = turn == cfg.max_turns  # the forced final turn: no retrieval after it
        params = sampling_config(cfg, min(cfg.max_new_tokens, traj.room(cfg)), request_seed(cfg, row, turn))
        start = time.perf_counter()
        out = await ctx.engine.agenerate(traj.context(cfg.max_context_length), params)
        end = time.perf_counter()
        ctx.generating.append((start, end))
        traj.timing["generate_s"] += end - start
        action = record_turn(traj, out, ctx.tokenizer, cfg, forced)
        if forced or traj.done:
            break
        request = plan_observation(traj, action, ctx.encoder, cfg, turn)
        if request is not None:
            await _search(traj, request, ctx, turn)
        if traj.done:
            break
    traj.timing["end_s"] = time.perf_counter() - ctx.start
    return finish_record(traj, targets)


async def arun_rollout(batch: DataProto, engine, client: RetrievalClient, tokenizer, cfg: AgentConfig) -> DataProto:
    """`run_rollout_async` as a coroutine; it must run on the loop the engine lives on (`shared_loop()`)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("[agent] the tokenizer has no pad_token_id; set tokenizer.pad_token")
    trajs = [Trajectory(prompt=p) for p in prompt_ids_of(batch)]
    targets = row_targets(batch)
    slots = asyncio.Semaphore(cfg.max_concurrent_trajectories)
    async with open_retrieval_session(client, max_connections=cfg.max_concurrent_trajectories) as retriever:
        ctx = _Shared(as_async_engine(engine), retriever, tokenizer, ObservationEncoder(tokenizer), cfg,
                      time.perf_counter())

        async def one(row: int) -> TrajectoryRecord:
            async with slots:
                return await _run_trajectory(row, trajs[row], targets[row], ctx)

        tasks = [asyncio.create_task(one(row)) for row in range(len(trajs))]
        try:
            records = await asyncio.gather(*tasks)
        except BaseException:  # abort (or a failing engine): stop the other trajectories, then re-raise
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
    wall = time.perf_counter() - ctx.start
    generate = _union_s(ctx.generating)
    timings = RolloutTimings(generate=generate, retrieve=_union_s(ctx.retrieving),
                             either=_union_s(ctx.generating + ctx.retrieving),
                             engine_busy_fraction=generate / wall if wall > 0 else 0.0)
    return compose_output(batch, trajs, tokenizer, cfg, timings, wall, records=list(records))


def run_rollout_async(batch: DataProto, engine, client: RetrievalClient, tokenizer, cfg: AgentConfig) -> DataProto:
    """Run the search agent with one concurrent turn loop per trajectory; same output as `loop.run_rollout`.

    engine: an AsyncRolloutEngine (e.g. AsyncVLLMEngine), a batch RolloutBackend (run through BatchingEngine; a
    backend with several `replicas()`, such as the trainer's worker group, gets least-busy placement over them) or
    a list of them (data-parallel replicas, least-busy placement). Runs on the shared rollout event loop.
    meta_info["rollout_metrics"] adds rollout/engine_busy_fraction; timing_s/rollout_generate and _retrieve are the
    wall time during which the engine, resp. the retriever, had work (they overlap).
    """
    return run_sync(arun_rollout(batch, engine, client, tokenizer, cfg))
