"""Dynamic micro-batching: one owner thread runs every encode+search; concurrent requests are coalesced.

Requests `(queries, topk)` go into a queue. The owner thread takes the first waiting request, then keeps taking
more until the batch holds `max_batch_queries` queries or `max_wait_ms` have passed since that first request was
queued (requests that queued while the previous batch ran are therefore flushed at once). It runs one
`search_fn(all_queries, max_topk)` call and hands each request its slice (cut to its own topk).

With `coalesce=False` each request is run alone (same thread, same code path): the baseline of bench (c).
The owner thread is the only one touching the encoder and the index, so neither needs to be thread-safe.

`GuardedPipelineBatcher` (mode="guarded") runs the bf16 pass on worker threads and adds an owner thread for the fp32
fallback pass, so the bf16 pass of one batch and the fp32 re-encode of the previous batch's fallback queries run at
once on two cores. The threads share only the FAISS index (read-only search is thread-safe) and the tokenizer
(Encoder serialises it). Without a fallback (`fallback_fn=None`) it is the parallel `sorted` path: fp32 chunks on
several worker threads with one torch thread each, which keeps both cores of a small CPU busy where one owner
thread with 2 OpenMP threads loses time in their barriers (docs/retrieval_speed.md).
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
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


def take_more(q: queue.Queue, items: list, size: Callable, limit: int, deadline: float) -> list:
    """Append items from `q` to `items` until their total `size` reaches `limit` or `deadline` (perf_counter) passes;
    items already queued are taken even after the deadline. A _STOP taken from the queue ends the list."""
    n = sum(size(item) for item in items)
    while n < limit:
        try:
            item = q.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            break
        items.append(item)
        if item is _STOP:
            break
        n += size(item)
    return items


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
            self._wait_for_capacity()
            jobs = self._collect(first) if self.config.coalesce else [first]
            if jobs[-1] is _STOP:
                self._execute(jobs[:-1])
                return
            self._execute(jobs)

    def _wait_for_capacity(self) -> None:
        """Called before a batch is collected; the owner thread runs each batch itself, so it never waits."""

    def _collect(self, first: _Job) -> list:
        """Take more jobs until max_batch_queries or first.queued_at + max_wait_ms."""
        return take_more(self._queue, [first], lambda job: len(job.queries), self.config.max_batch_queries,
                         first.queued_at + self.config.max_wait_ms / 1000.0)

    def _execute(self, jobs: list[_Job]) -> None:
        # a request whose client went away (future cancelled) is dropped here
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        queries = [q for job in jobs for q in job.queries]
        topk = max(job.topk for job in jobs)
        t0 = time.perf_counter()
        try:
            result = self.search_fn(queries, topk)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request, the thread lives on
            logger.exception("search failed for a batch of %d queries", len(queries))
            for job in jobs:
                job.future.set_exception(exc)
            return
        self.busy_s += time.perf_counter() - t0
        self.batch_ms.append((time.perf_counter() - t0) * 1000)
        self.batch_sizes.append(len(queries))
        self.num_batches += 1
        ids, scores = result  # (N, topk) each: each job gets its rows, cut to its own topk
        start = 0
        for job in jobs:
            stop = start + len(job.queries)
            job.future.set_result((np.asarray(ids[start:stop, :job.topk]), np.asarray(scores[start:stop, :job.topk])))
            start = stop


class _Batch:
    """One coalesced batch in the guarded pipeline: its jobs, their rows of the result arrays, and per job how many
    pieces of work (its bf16 rows, then each fp32 redo touching it) are still outstanding."""

    def __init__(self, jobs: list[_Job], topk: int, chunk_queries: int):
        self.jobs, self.topk = jobs, topk
        sizes = [len(job.queries) for job in jobs]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # job j: rows starts[j]:starts[j+1]
        n = int(self.starts[-1])
        self.ids = np.full((n, topk), -1, np.int64)  # (N, topk)
        self.scores = np.zeros((n, topk), np.float32)
        self.chunk_starts = np.arange(0, n, chunk_queries)  # the bf16 pass runs rows c:c+chunk_queries per chunk
        # per job: the bf16 chunks holding its rows (they may finish in any order) + fp32 redos added later, still to
        # finish; a job with no rows counts 1, settled at once
        self.outstanding = [max(1, int(np.sum((self.chunk_starts < e) & (self.chunk_starts + chunk_queries > s))))
                            for s, e in zip(self.starts[:-1], self.starts[1:])]
        self.lock = threading.Lock()

    def jobs_of(self, rows: np.ndarray) -> np.ndarray:
        """Indices of the jobs owning `rows` (sorted, unique)."""
        return np.unique(np.searchsorted(self.starts, rows, side="right") - 1)

    def settle(self, job_ids, exc: BaseException | None = None) -> None:
        """One piece of work of each job in `job_ids` is finished (or failed with `exc`): answer the jobs that are
        complete. A failed job is answered with the exception at once."""
        with self.lock:
            ready = []
            for j in job_ids:
                job = self.jobs[j]
                if job.future.done():
                    continue
                self.outstanding[j] -= 1
                if exc is not None:
                    job.future.set_exception(exc)
                elif self.outstanding[j] == 0:
                    ready.append(j)
            for j in ready:
                job, a, b = self.jobs[j], self.starts[j], self.starts[j + 1]
                job.future.set_result((self.ids[a:b, :job.topk].copy(), self.scores[a:b, :job.topk].copy()))


@dataclass
class _Redo:
    """Rows of a batch that the bf16 pass could not vouch for, waiting for the fp32 pass."""

    batch: _Batch
    rows: np.ndarray  # (m,) row numbers in the batch
    queries: list[str]  # (m,)


class GuardedPipelineBatcher(MicroBatcher):
    """Micro-batching for mode="guarded" (encoders.guarded_search), the two passes on separate threads.

    The owner thread coalesces requests as MicroBatcher does and cuts each batch into chunks of `chunk_queries`;
    `first_workers` threads run `first_fn(chunk, topk) -> GuardedResult` (bf16 encode + search) on them, and the
    rows the guard rejects go to the fp32 thread as soon as their chunk is done. The fp32 thread takes every waiting
    redo (up to max_batch_queries queries, waiting up to max_wait_ms for more) and runs
    `fallback_fn(queries, topk) -> (ids, scores)` (fp32 encode +
    search) on them. A request is answered when all its rows are final, so one with no fallback never waits for an
    fp32 pass, and with 1 torch thread per worker every core stays busy, also when one request carries the whole
    batch (the owner blocks while all bf16 workers are busy, so requests keep coalescing). Results equal
    `guarded_search` on the same chunks.

    `fallback_fn=None`: `first_fn(chunk, topk) -> (ids, scores)` is final (no guard, no fp32 thread): the chunks of a
    batch are simply encoded and searched on `first_workers` threads at once.
    """

    def __init__(self, first_fn: Callable, fallback_fn: Callable | None, config: BatcherConfig = BatcherConfig(),
                 name: str = "retriever-owner", chunk_queries: int = 64, first_workers: int = 2):
        if chunk_queries <= 0 or first_workers <= 0:
            raise ValueError(f"[batcher] chunk_queries and first_workers must be positive, got {chunk_queries}, "
                             f"{first_workers}")
        self.fallback_fn, self.chunk_queries = fallback_fn, chunk_queries
        self._redo_queue: queue.Queue = queue.Queue()
        self.fallback_batch_sizes: deque[int] = deque(maxlen=10000)
        self.fallback_busy_s = 0.0
        # bf16 chunks run on `first_workers` threads; the owner thread blocks while all of them are busy, so
        # requests keep coalescing meanwhile
        self._first_pool = ThreadPoolExecutor(first_workers, thread_name_prefix=name + ("-bf16" if fallback_fn else
                                                                                        "-encode"))
        self._free_workers = threading.Semaphore(first_workers)
        self._stats_lock = threading.Lock()
        super().__init__(first_fn, config, name)
        self._fallback_thread = None
        if fallback_fn is not None:
            self._fallback_thread = threading.Thread(target=self._run_fallback, name=name + "-fp32", daemon=True)
            self._fallback_thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        super().close(timeout_s)  # the owner thread has handed out its last chunk
        self._first_pool.shutdown(wait=True)  # every chunk is done, so every redo is queued before _STOP
        if self._fallback_thread is not None:
            self._redo_queue.put(_STOP)
            self._fallback_thread.join(timeout_s)

    def _wait_for_capacity(self) -> None:
        # close the batch only once a bf16 worker is free to take it: while all are busy, requests keep coalescing
        # (under load a batch is everything that arrived meanwhile, not a 2 ms sample of it); _execute releases it
        self._free_workers.acquire()

    def _execute(self, jobs: list[_Job]) -> None:
        """Hand the batch to the bf16 workers chunk by chunk; called holding one free worker slot."""
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            self._free_workers.release()
            return
        queries = [q for job in jobs for q in job.queries]
        batch = _Batch(jobs, max(job.topk for job in jobs), self.chunk_queries)
        batch.settle(np.flatnonzero(batch.starts[:-1] == batch.starts[1:]))  # jobs with no queries are done already
        with self._stats_lock:
            self.batch_sizes.append(len(queries))
            self.num_batches += 1
        if not queries:
            self._free_workers.release()
            return
        for i, a in enumerate(batch.chunk_starts):
            if i > 0:
                self._free_workers.acquire()
            self._first_pool.submit(self._first_chunk, batch, queries, int(a), min(int(a) + self.chunk_queries,
                                                                                   len(queries)))

    def _first_chunk(self, batch: _Batch, queries: list[str], a: int, b: int) -> None:
        """bf16 pass over rows a:b of a batch (on a worker thread): write them, queue the rows the guard rejects,
        settle the jobs that have rows in a:b."""
        try:
            t0 = time.perf_counter()
            try:
                first = self.search_fn(queries[a:b], batch.topk)  # GuardedResult, rows a:b
            except Exception as exc:  # noqa: BLE001 - handed to the batch's requests, the thread lives on
                logger.exception("bf16 pass failed for %d queries", b - a)
                batch.settle(range(len(batch.jobs)), exc)
                return
            with self._stats_lock:
                self.busy_s += time.perf_counter() - t0
                self.batch_ms.append((time.perf_counter() - t0) * 1000)
            if self.fallback_fn is None:  # (ids, scores), final
                batch.ids[a:b], batch.scores[a:b] = first
                rows = np.empty(0, np.int64)
            else:
                batch.ids[a:b], batch.scores[a:b] = first.ids, first.scores
                rows = a + np.flatnonzero(first.fallback)
            if rows.size:
                with batch.lock:
                    for j in batch.jobs_of(rows):
                        batch.outstanding[j] += 1
                self._redo_queue.put(_Redo(batch, rows, [queries[r] for r in rows]))
            starts, ends = batch.starts[:-1], batch.starts[1:]
            batch.settle(np.flatnonzero((starts < b) & (ends > a)))  # the jobs with rows in this chunk
        finally:
            self._free_workers.release()

    def _run_fallback(self) -> None:
        while True:
            redo = self._redo_queue.get()
            if redo is _STOP:
                return
            # like the owner: take more redos until max_batch_queries or max_wait_ms after this first one (an fp32
            # pass over 1 query costs ~17 ms here, over 8 ~7 ms each: small passes waste the core)
            redos = take_more(self._redo_queue, [redo], lambda r: len(r.rows), self.config.max_batch_queries,
                              time.perf_counter() + self.config.max_wait_ms / 1000.0)
            stop = redos[-1] is _STOP
            self._redo(redos[:-1] if stop else redos)
            if stop:
                return

    def _redo(self, redos: list[_Redo]) -> None:
        queries = [q for r in redos for q in r.queries]
        topk = max(r.batch.topk for r in redos)
        t0 = time.perf_counter()
        try:
            ids, scores = self.fallback_fn(queries, topk)  # (M, topk) each
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests, the thread lives on
            logger.exception("fp32 fallback failed for %d queries", len(queries))
            for r in redos:
                r.batch.settle(r.batch.jobs_of(r.rows), exc)
            return
        self.fallback_busy_s += time.perf_counter() - t0
        self.fallback_batch_sizes.append(len(queries))
        start = 0
        for r in redos:
            k = r.batch.topk
            r.batch.ids[r.rows], r.batch.scores[r.rows] = ids[start:start + len(r.rows), :k], scores[start:start + len(r.rows), :k]
            start += len(r.rows)
            r.batch.settle(r.batch.jobs_of(r.rows))
