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
