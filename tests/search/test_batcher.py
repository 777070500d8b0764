"""Micro-batcher: coalescing concurrent requests, per-request slicing, no-coalesce baseline, error fan-out."""
import asyncio
import threading
import time

import numpy as np
import pytest

from stepsearch.search.batcher import BatcherConfig, MicroBatcher


def fake_search(calls):
    """search_fn whose result is a pure function of the query text, so slices can be checked exactly."""

    def search(queries, topk):
        calls.append((list(queries), topk, threading.current_thread().name))
        time.sleep(0.02)  # the owner is busy: requests pile up meanwhile
        base = np.array([int(q.split("-")[1]) for q in queries], dtype=np.int64)[:, None]  # (N, 1)
        ids = base * 100 + np.arange(topk)[None, :]  # (N, topk)
        return ids, -ids.astype(np.float32)

    return search


async def fire(batcher, n, topk_of=lambda i: 1 + i % 3):
    return await asyncio.gather(*(batcher.submit([f"q-{i}", f"q-{i + 1000}"], topk_of(i)) for i in range(n)))


@pytest.mark.parametrize("coalesce", [True, False])
def test_each_request_gets_its_own_slice(coalesce):
    calls = []
    batcher = MicroBatcher(fake_search(calls), BatcherConfig(max_batch_queries=64, max_wait_ms=5, coalesce=coalesce))
    try:
        results = asyncio.run(fire(batcher, 16))
    finally:
        batcher.close()
    for i, (ids, scores) in enumerate(results):
        k = 1 + i % 3
        expected = np.array([[i * 100 + j for j in range(k)], [(i + 1000) * 100 + j for j in range(k)]])
        assert ids.tolist() == expected.tolist() and scores.tolist() == (-expected).tolist()
    assert {name for _, _, name in calls} == {"retriever-owner"}  # one owner thread ran every search
    if coalesce:
        assert len(calls) < 16 and max(len(q) for q, _, _ in calls) > 2
        assert sum(len(q) for q, _, _ in calls) == 32
    else:
        assert len(calls) == 16 and all(len(q) == 2 for q, _, _ in calls)


def test_flush_at_max_batch_queries():
    calls = []
    batcher = MicroBatcher(fake_search(calls), BatcherConfig(max_batch_queries=4, max_wait_ms=1000))
    try:
        t0 = time.perf_counter()
        asyncio.run(fire(batcher, 6))  # 12 queries, 2 per request -> batches of at most 2 requests + 1 overflow
        elapsed = time.perf_counter() - t0
    finally:
        batcher.close()
    assert all(len(q) <= 4 for q, _, _ in calls[1:])
    assert elapsed < 1.0  # full batches flush without waiting out max_wait_ms


def test_errors_reach_every_request_and_the_thread_survives():
    def failing(queries, topk):
        if any(q == "boom" for q in queries):
            raise RuntimeError("index exploded")
        return np.zeros((len(queries), topk), np.int64), np.zeros((len(queries), topk), np.float32)

    batcher = MicroBatcher(failing, BatcherConfig(max_wait_ms=1))
    try:
        with pytest.raises(RuntimeError, match="index exploded"):
            asyncio.run(batcher.submit(["boom"], 2))
        ids, _ = asyncio.run(batcher.submit(["fine"], 2))
        assert ids.shape == (1, 2)
    finally:
        batcher.close()


# ---------------------------------------------------------------- GuardedPipelineBatcher (mode="guarded")
def test_pipeline_answers_clean_requests_without_waiting_for_the_fp32_pass():
    """Queries named 'slow-*' need the fallback. While the fp32 pass is held, a request with no such query still
    completes, and the held ones get their fallback rows (ids 7000+) with the bf16 rows kept."""
    from stepsearch.search.batcher import GuardedPipelineBatcher
    from stepsearch.search.encoders import GuardedResult

    release, threads = threading.Event(), {}

    def first(queries, topk):  # bf16 pass: ids 100*i + j; fallback for 'slow-*'
        threads["first"] = threading.current_thread().name
        base = np.array([int(q.split("-")[1]) for q in queries], dtype=np.int64)[:, None]
        ids = base * 100 + np.arange(topk)[None, :]
        return GuardedResult(ids, -ids.astype(np.float32), np.array([q.startswith("slow") for q in queries]))

    def fallback(queries, topk):  # fp32 pass: ids 7000 + 100*i + j, once released
        threads["fallback"] = threading.current_thread().name
        assert all(q.startswith("slow") for q in queries)
        release.wait(10)
        base = np.array([int(q.split("-")[1]) for q in queries], dtype=np.int64)[:, None]
        ids = 7000 + base * 100 + np.arange(topk)[None, :]
        return ids, -ids.astype(np.float32)

    batcher = GuardedPipelineBatcher(first, fallback, BatcherConfig(max_batch_queries=64, max_wait_ms=5))
    try:
        held = batcher.submit_future(["slow-1", "q-2"], 2)
        time.sleep(0.1)  # the fp32 pass of 'slow-1' is now running (and held)
        clean = batcher.submit_future(["q-3", "q-4"], 3)
        ids, scores = clean.result(timeout=5)  # answered while the fp32 pass still holds
        assert ids.tolist() == [[300, 301, 302], [400, 401, 402]] and scores.tolist() == (-ids).tolist()
        assert not held.done()
        release.set()
        ids, _ = held.result(timeout=5)
        assert ids.tolist() == [[7100, 7101], [200, 201]]  # row 0 from the fp32 pass, row 1 from the bf16 pass
    finally:
        release.set()
        batcher.close()
    assert threads["first"].startswith("retriever-owner-bf16") and threads["fallback"] == "retriever-owner-fp32"


def test_pipeline_fallback_errors_reach_only_their_requests():
    from stepsearch.search.batcher import GuardedPipelineBatcher
    from stepsearch.search.encoders import GuardedResult

    def first(queries, topk):
        ids = np.zeros((len(queries), topk), np.int64)
        return GuardedResult(ids, ids.astype(np.float32), np.array([q == "bad" for q in queries]))

    def fallback(queries, topk):
        raise RuntimeError("fp32 encoder fell over")

    batcher = GuardedPipelineBatcher(first, fallback, BatcherConfig(max_wait_ms=1))
    try:
        bad = batcher.submit_future(["ok", "bad"], 3)
        with pytest.raises(RuntimeError, match="fell over"):
            bad.result(timeout=5)
        ids, _ = batcher.submit_future(["ok"], 3).result(timeout=5)  # both threads live on
        assert ids.shape == (1, 3)
    finally:
        batcher.close()


def test_pipeline_splits_one_big_request_into_chunks():
    """One request of 150 queries, chunks of 64: the fp32 pass of chunk 1 runs while thread 1 encodes chunk 2, and
    the answer holds every row, fallback rows from the fp32 pass. Empty requests are answered too."""
    from stepsearch.search.batcher import GuardedPipelineBatcher
    from stepsearch.search.encoders import GuardedResult

    first_calls, overlap = [], []
    fallback_running = threading.Event()

    def first(queries, topk):
        first_calls.append(len(queries))
        if len(first_calls) == 2:  # chunk 2: wait until the fp32 pass of chunk 1 is under way
            overlap.append(fallback_running.wait(5))
        base = np.array([int(q.split("-")[1]) for q in queries], dtype=np.int64)[:, None]
        ids = base * 100 + np.arange(topk)[None, :]
        return GuardedResult(ids, -ids.astype(np.float32), (base[:, 0] % 7 == 0))  # every 7th query falls back

    def fallback(queries, topk):
        fallback_running.set()
        time.sleep(0.05)
        base = np.array([int(q.split("-")[1]) for q in queries], dtype=np.int64)[:, None]
        ids = 90000 + base * 100 + np.arange(topk)[None, :]
        return ids, -ids.astype(np.float32)

    batcher = GuardedPipelineBatcher(first, fallback, BatcherConfig(max_wait_ms=1), chunk_queries=64)
    try:
        ids, scores = batcher.submit_future([f"q-{i}" for i in range(150)], 2).result(timeout=10)
        empty_ids, _ = batcher.submit_future([], 3).result(timeout=5)
    finally:
        batcher.close()
    assert first_calls[:3] == [64, 64, 22] and overlap == [True]
    want = np.array([[(90000 if i % 7 == 0 else 0) + i * 100 + j for j in range(2)] for i in range(150)])
    assert ids.tolist() == want.tolist() and scores.tolist() == (-want).tolist()
    assert empty_ids.shape == (0, 3)


def test_pipeline_waits_for_every_chunk_of_a_request_when_chunks_finish_out_of_order():
    """Chunk 1 of a 3-chunk request is the slowest: the answer must still hold its rows (no -1 left)."""
    from stepsearch.search.batcher import GuardedPipelineBatcher
    from stepsearch.search.encoders import GuardedResult

    def first(queries, topk):
        base = np.array([int(q.split("-")[1]) for q in queries], dtype=np.int64)[:, None]
        if base[0, 0] == 0:
            time.sleep(0.3)  # chunk 1 finishes last
        ids = base * 10 + np.arange(topk)[None, :]
        return GuardedResult(ids, -ids.astype(np.float32), np.zeros(len(queries), bool))

    batcher = GuardedPipelineBatcher(first, lambda q, k: None, BatcherConfig(max_wait_ms=1), chunk_queries=4,
                                     first_workers=3)
    try:
        ids, _ = batcher.submit_future([f"q-{i}" for i in range(10)], 1).result(timeout=5)
    finally:
        batcher.close()
    assert ids[:, 0].tolist() == [10 * i for i in range(10)]


def test_parallel_sorted_path_equals_one_owner_thread():
    """fallback_fn=None (the parallel `sorted` path): each request gets the rows a single owner thread gives it, and
    the chunks of one big request run on two worker threads at the same time."""
    from stepsearch.search.batcher import GuardedPipelineBatcher

    both_running = threading.Barrier(2, timeout=5)
    met = []

    def search(queries, topk):
        if queries[0] == "big-0":  # chunk 1 of the big request waits for chunk 2 to start
            met.append(both_running.wait() is not None)
        elif queries[0] == "big-8":
            both_running.wait()
        return fake_search([])(queries, topk)

    calls = []
    one_owner = MicroBatcher(fake_search(calls), BatcherConfig(max_wait_ms=1))
    parallel = GuardedPipelineBatcher(search, None, BatcherConfig(max_wait_ms=1), chunk_queries=8, first_workers=2)
    try:
        big = [f"big-{i}" for i in range(20)]
        got = parallel.submit_future(big, 3).result(timeout=10)
        want = one_owner.submit_future(big, 3).result(timeout=10)
        small = asyncio.run(fire(parallel, 12))
        small_want = asyncio.run(fire(one_owner, 12))
    finally:
        parallel.close()
        one_owner.close()
    assert met == [True]  # the two chunks overlapped
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
    for (ids, scores), (ids_w, scores_w) in zip(small, small_want):
        assert ids.tolist() == ids_w.tolist() and scores.tolist() == scores_w.tolist()
    assert parallel._fallback_thread is None  # no fp32 thread without a fallback
