"""Dynamic micro-batching: one owner thread runs every encode+search; concurrent requests are coalesced.

Requests `(queries, topk)` go into a queue. The owner thread takes the first waiting request, then keeps taking
more until the batch holds `max_batch_queries` queries or `max_wait_ms` have passed since that first request was
queued (requests that queued while the previous batch ran are therefore flushed at once). It runs one
`search_fn(all_queries, max_topk)` call and hands each request its slice (cut to its own topk).

With `coalesce=False` each request is run alone (same thread, same code path): the baseline of bench (c).
The owner thread is the only one touching the encoder and the index, so neither needs to be thread-safe.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatcherConfig:
    # flush once the coalesced batch holds this many queries
    max_batch_queries: int = 256
    # ... or this long after the first waiting request was queued
    max_wait_ms: float = 2.0
    coalesce: bool = True

    def __post_init__(self):
        if self.max_batch_queries <= 0:
            raise ValueError(f"[batcher] max_batch_queries must be positive, got {self.max_batch_queries}")
        if self.max_wait_ms < 0:
            raise ValueError(f"[batcher] max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass
class _Job:
    queries: list[str]
    topk: int
    future: Future
    queued_at: float = field(default_factory=time.perf_counter)


_STOP = object()


class MicroBatcher:
    """`await batcher.submit(queries, topk)` -> whatever `search_fn` returns, sliced to this request.

    `search_fn(queries: list[str], topk: int) -> (ids (N, k), scores (N, k))` numpy arrays; `submit` resolves to
    `(ids (n, topk), scores (n, topk))` for the request's n queries.
    """

    def __init__(self, search_fn: Callable, config: BatcherConfig = BatcherConfig(), name: str = "retriever-owner"):
        self.search_fn = search_fn
        self.config = config
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.batch_sizes: deque[int] = deque(maxlen=10000)  # queries per search_fn call (recent)
        self.batch_ms: deque[float] = deque(maxlen=10000)  # wall time of each search_fn call (recent)
        self.num_batches = 0
        self.busy_s = 0.0  # total wall time inside search_fn (owner-thread utilisation = busy_s / elapsed)
        self._thread.start()

    async def submit(self, queries: list[str], topk: int):
        return await asyncio.wrap_future(self.submit_future(queries, topk))

    def submit_future(self, queries: list[str], topk: int) -> Future:
        fut: Future = Future()
        self._queue.put(_Job(list(queries), int(topk), fut))
        return fut

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs = self._collect(first) if self.config.coalesce else [first]
            if jobs[-1] is _STOP:
                self._execute(jobs[:-1])
                return
            self._execute(jobs)

    def _collect(self, first: _Job) -> list:
        """Take more jobs until max_batch_queries or first.queued_at + max_wait_ms."""
        jobs, n = [first], len(first.queries)
        deadline = first.queued_at + self.config.max_wait_ms / 1000.0
        while n < self.config.max_batch_queries:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            jobs.append(job)
            if job is _STOP:
                break
            n += len(job.queries)
        return jobs

    def _execute(self, jobs: list[_Job]) -> None:
        # a request whose client went away (future cancelled) is dropped here
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        queries = [q for job in jobs for q in job.queries]
        topk = max(job.topk for job in jobs)
        t0 = time.perf_counter()
        try:
            ids, scores = self.search_fn(queries, topk)  # (N, topk) each
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request, the thread lives on
            logger.exception("search failed for a batch of %d queries", len(queries))
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.busy_s += time.perf_counter() - t0
        self.batch_ms.append((time.perf_counter() - t0) * 1000)
        self.batch_sizes.append(len(queries))
        self.num_batches += 1
        start = 0
        for job in jobs:
            stop = start + len(job.queries)
            job.future.set_result((np.asarray(ids[start:stop, :job.topk]), np.asarray(scores[start:stop, :job.topk])))
            start = stop
