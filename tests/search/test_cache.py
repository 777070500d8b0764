"""Cache: key normalization, LRU eviction, Redis layer persistence/TTL, and surviving a Redis crash."""
import time

import pytest
import redis

from stepsearch.search.cache import LRU, CacheConfig, RetrievalCache, normalize_query
from stepsearch.search.testing import start_redis

HITS = [{"document": {"id": "1", "title": "T", "text": "x", "contents": '"T"\nx'}, "score": 0.5}]


@pytest.mark.parametrize("query, mode, expected", [
    ("  Who  wrote\tHamlet? ", "whitespace", "Who wrote Hamlet?"),
    ("ﬁne", "whitespace", "fine"),  # NFKC folds the ligature
    ("The Who, live!", "squad", "who live"),
    ("An apple a day", "squad", "apple day"),
])
def test_normalize_query(query, mode, expected):
    assert normalize_query(query, mode) == expected


def test_lru_evicts_least_recently_used():
    lru = LRU(2)
    lru.put("a", "1")
    lru.put("b", "2")
    assert lru.get("a") == "1"  # a is now the most recent
    lru.put("c", "3")
    assert lru.get("b") is None and lru.get("a") == "1" and lru.get("c") == "3"


def test_key_covers_query_topk_and_identity():
    cache = RetrievalCache(CacheConfig(), identity="idx-A")
    other = RetrievalCache(CacheConfig(), identity="idx-B")
    assert cache.key("who wrote hamlet", 3) == cache.key("  who wrote   hamlet ", 3)
    assert cache.key("who wrote hamlet", 3) != cache.key("who wrote hamlet", 5)
    assert cache.key("who wrote hamlet", 3) != other.key("who wrote hamlet", 3)


def test_lru_only_cache_counts_hits_and_misses():
    cache = RetrievalCache(CacheConfig(), identity="x")
    assert cache.get_many(["q1", "q2"], 3) == [None, None]
    cache.put_many(["q1"], 3, [HITS])
    assert cache.get_many(["q1", "q2"], 3) == [HITS, None]
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 3
    assert cache.health()["redis"] == "disabled"


def test_redis_persists_across_instances_with_ttl():
    proc = start_redis()
    try:
        cfg = CacheConfig(redis_url=proc.url, ttl_s=120)
        first = RetrievalCache(cfg, identity="idx")
        first.put_many(["who wrote hamlet"], 3, [HITS])
        # a new process-level cache (empty LRU) finds the entry in Redis: nothing is flushed at start-up
        second = RetrievalCache(cfg, identity="idx")
        assert second.get_many(["who wrote hamlet"], 3) == [HITS]
        assert second.stats()["redis_hits"] == 1 and second.stats()["lru_hits"] == 0
        ttl = redis.Redis.from_url(proc.url).ttl(second.key("who wrote hamlet", 3))
        assert 0 < ttl <= 120
    finally:
        proc.stop()


def test_redis_crash_serves_uncached_then_reconnects():
    proc = start_redis()
    port = proc.port
    try:
        cache = RetrievalCache(CacheConfig(redis_url=proc.url, retry_interval_s=0.2, lru_size=0), identity="idx")
        cache.put_many(["q"], 3, [HITS])
        assert cache.get_many(["q"], 3) == [HITS] and cache.health()["redis"] == "up"
        proc.kill()
        t0 = time.perf_counter()
        assert cache.get_many(["q"], 3) == [None]  # no exception: a miss
        cache.put_many(["q"], 3, [HITS])  # silently skipped
        assert time.perf_counter() - t0 < 2.0
        health = cache.health()
        assert health["redis"] == "down" and health["redis_error"]
        proc = start_redis(port=port)  # Redis comes back (empty: it had no persistence)
        time.sleep(0.3)  # past retry_interval_s
        assert cache.health()["redis"] == "up"
        cache.put_many(["q"], 3, [HITS])
        assert cache.get_many(["q"], 3) == [HITS]
    finally:
        proc.stop()
