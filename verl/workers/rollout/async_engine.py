"""Per-request (asynchronous) generation: one prompt in, one continuation out, many requests in flight.

A multi-turn rollout that runs every trajectory on its own (no barrier between turns) needs an engine it can
hand single requests to while others are running. This module holds what is engine-independent:

- `AsyncRolloutEngine`: the interface, `await engine.agenerate(prompt_ids, params) -> GenerationOutput`, plus
  `inflight` (requests submitted and not yet answered) and a `BusyMeter`. `params.seed` is the request's own seed.
- `BatchingEngine(backend)`: any batch `RolloutBackend` (HF, the trainer's worker group, the scripted engine of
  the tests) behind that interface. Requests that arrive while the backend is busy wait and go together in its
  next `generate` call, so the backend always runs as large a batch as is ready. The call carries every request's
  seed (`SamplingConfig.row_seeds`): a per-request engine (vLLM) samples each from its own seed; an engine with one
  RNG per call (HF) seeds the call only when the requests share one seed (greedy decoding is unaffected).
- `EnginePool(engines)`: data-parallel placement; each request goes to the engine with the fewest requests in
  flight (the lowest index on a tie).
- `shared_loop()` / `run_sync(coro)`: one process-wide event loop on a daemon thread. Engines that live on an
  event loop (vLLM's AsyncLLM) are created on it, and synchronous callers run coroutines on it, so an engine
  outlives any one rollout.

The vLLM engine is `verl.workers.rollout.vllm_async.AsyncVLLMEngine`.
"""
from __future__ import annotations

import abc
import asyncio
import threading
import time
from dataclasses import dataclass, replace
from typing import Awaitable, Sequence, TypeVar

from verl.workers.rollout.base import GenerationOutput, RolloutBackend, SamplingConfig

__all__ = ["AsyncRolloutEngine", "BusyMeter", "BatchingEngine", "EnginePool", "shared_loop", "run_sync",
           "cut_output"]

T = TypeVar("T")

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_THREAD: threading.Thread | None = None
_LOOP_LOCK = threading.Lock()


def shared_loop() -> asyncio.AbstractEventLoop:
    """The process-wide rollout event loop (started on first use on a daemon thread)."""
    global _LOOP, _LOOP_THREAD
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed() or not _LOOP_THREAD.is_alive():
            _LOOP = asyncio.new_event_loop()
            _LOOP_THREAD = threading.Thread(target=_LOOP.run_forever, name="rollout-event-loop", daemon=True)
            _LOOP_THREAD.start()
        return _LOOP


def run_sync(coro: Awaitable[T], timeout_s: float | None = None) -> T:
    """Run a coroutine on the shared loop and wait for its result (from any thread but the loop's own)."""
    loop = shared_loop()
    if threading.current_thread() is _LOOP_THREAD:
        raise RuntimeError("[rollout.async] run_sync was called from the rollout event loop itself; await the "
                           "coroutine instead")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout_s)
    except BaseException:
        future.cancel()  # an interrupted caller must not leave the rollout running on the loop
        raise


class BusyMeter:
    """Time accounting of one engine: busy_s (wall seconds with at least one request in flight), request_s (the
    integral of the in-flight count over time; request_s / busy_s is the mean concurrency while busy), requests
    and generated tokens. Call `start()` when a request enters the engine and `finish(n_tokens)` when it leaves."""

    def __init__(self):
        self.inflight = 0
        self.busy_s = 0.0
        self.request_s = 0.0
        self.requests = 0
        self.tokens = 0
        self._last = time.perf_counter()

    def _advance(self) -> None:
        now = time.perf_counter()
        if self.inflight > 0:
            self.busy_s += now - self._last
            self.request_s += (now - self._last) * self.inflight
        self._last = now

    def start(self, n: int = 1) -> None:
        self._advance()
        self.inflight += n
        self.requests += n

    def finish(self, tokens: int = 0, n: int = 1) -> None:
        self._advance()
        self.inflight -= n
        self.tokens += tokens

    def snapshot(self) -> dict:
        """The counters now (busy_s and request_s brought up to date)."""
        self._advance()
        return {"busy_s": self.busy_s, "request_s": self.request_s, "requests": self.requests, "tokens": self.tokens}


class AsyncRolloutEngine(abc.ABC):
    """One request at a time, many in flight: `await agenerate(prompt_ids, params)`."""

    meter: BusyMeter

    @abc.abstractmethod
    async def agenerate(self, prompt_ids: Sequence[int], params: SamplingConfig) -> GenerationOutput:
        """The continuation of one prompt (ids without padding); `params.seed` seeds this request alone."""

    @property
    @abc.abstractmethod
    def inflight(self) -> int:
        """Requests submitted and not yet answered (queued ones included)."""


def cut_output(out: GenerationOutput, max_new_tokens: int) -> GenerationOutput:
    """The output limited to `max_new_tokens` ids (finish reason "length" when something was cut)."""
    if len(out.token_ids) <= max_new_tokens:
        return out
    log_probs = None if out.log_probs is None else out.log_probs[:max_new_tokens]
    return GenerationOutput(token_ids=out.token_ids[:max_new_tokens], log_probs=log_probs, finish_reason="length")


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingConfig
    future: asyncio.Future


def _group_key(params: SamplingConfig) -> SamplingConfig:
    """Requests whose settings differ only in max_new_tokens and seed can share one backend call."""
    return replace(params, max_new_tokens=1, seed=None, row_seeds=None)


class BatchingEngine(AsyncRolloutEngine):
    """A batch `RolloutBackend` behind the per-request interface.

    While the backend runs a call, new requests wait; when it returns, every waiting request with the same sampling
    settings goes into the next call (max_new_tokens: the largest asked for; each output is then cut to its own
    limit). `gather_s` is how long the engine waits before a call, so that requests answered by the previous call
    can come back with their next turn and join it. The backend's `generate` runs in a worker thread.
    """

    def __init__(self, backend: RolloutBackend, gather_s: float = 0.002):
        if not isinstance(backend, RolloutBackend):
            raise TypeError(f"[rollout.async] BatchingEngine needs a RolloutBackend, got {type(backend).__name__}")
        if gather_s < 0:
            raise ValueError(f"[rollout.async] gather_s must be >= 0, got {gather_s}")
        self.backend = backend
        self.gather_s = gather_s
        self.meter = BusyMeter()
        self.calls = 0
        self._pending: list[_Request] = []
        self._running = 0
        self._worker: asyncio.Task | None = None

    @property
    def inflight(self) -> int:
        return len(self._pending) + self._running

    async def agenerate(self, prompt_ids: Sequence[int], params: SamplingConfig) -> GenerationOutput:
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Request([int(t) for t in prompt_ids], params, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(self.gather_s)
            waiting, self._pending = self._pending, []
            groups: dict[SamplingConfig, list[_Request]] = {}
            for request in waiting:
                groups.setdefault(_group_key(request.params), []).append(request)
            for group in groups.values():
                await self._run(group)

    async def _run(self, group: list[_Request]) -> None:
        """One backend call for `group`; each request's future gets its own (cut) output or the call's error."""
        seeds = [r.params.seed for r in group]  # each request's own seed
        distinct = set(seeds)
        params = replace(group[0].params, max_new_tokens=max(r.params.max_new_tokens for r in group),
                         seed=distinct.pop() if len(distinct) == 1 else None,
                         row_seeds=None if None in seeds else tuple(seeds))
        self._running = len(group)
        self.meter.start(len(group))
        outputs: list[GenerationOutput] = []
        try:
            outputs = await asyncio.to_thread(self.backend.generate, [r.prompt_ids for r in group], params)
            if len(outputs) != len(group):
                raise RuntimeError(f"[rollout.async] {type(self.backend).__name__}.generate returned {len(outputs)} "
                                   f"outputs for {len(group)} prompts")
        except Exception as err:  # every waiting trajectory learns of the failure
            for r in group:
                if not r.future.done():
                    r.future.set_exception(err)
            return
        finally:
            self.calls += 1
            self._running = 0
            self.meter.finish(sum(len(o.token_ids) for o in outputs), n=len(group))
        for r, out in zip(group, outputs):
            if not r.future.done():
                r.future.set_result(cut_output(out, r.params.max_new_tokens))


class EnginePool(AsyncRolloutEngine):
    """Several engines (data-parallel replicas); each request goes to the one with the fewest in flight."""

    def __init__(self, engines: Sequence[AsyncRolloutEngine]):
        engines = list(engines)
        if not engines:
            raise ValueError("[rollout.async] EnginePool needs at least one engine")
        bad = [type(e).__name__ for e in engines if not isinstance(e, AsyncRolloutEngine)]
        if bad:
            raise TypeError(f"[rollout.async] EnginePool takes AsyncRolloutEngine instances, got {bad}; wrap a batch "
                            f"RolloutBackend in BatchingEngine")
        self.engines = engines
        self.dispatched = [0] * len(engines)
        self.meter = BusyMeter()

    @property
    def inflight(self) -> int:
        return sum(e.inflight for e in self.engines)

    def pick(self) -> int:
        """Index of the least-busy engine (fewest requests in flight; the lowest index on a tie)."""
        return min(range(len(self.engines)), key=lambda i: (self.engines[i].inflight, i))

    async def agenerate(self, prompt_ids: Sequence[int], params: SamplingConfig) -> GenerationOutput:
        index = self.pick()
        self.dispatched[index] += 1
        self.meter.start()
        out = None
        try:
            out = await self.engines[index].agenerate(prompt_ids, params)
            return out
        finally:
            self.meter.finish(0 if out is None else len(out.token_ids))
