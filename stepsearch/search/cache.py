"""Retrieval cache: an in-process LRU in front of Redis.

Key = sha1(index identity, topk, normalized query); value = the query's hits as JSON
(`[{"document": row, "score": float}, ...]`). Unlike StepSearch's cache (docs/method.md §3.4) the key includes topk and the
index identity (so two indexes or two topk values never share an entry), Redis is never flushed at start-up (entries
persist across restarts; TTL `ttl_s`), and a dead Redis only turns the cache off: lookups miss, the server keeps
answering, `/health` says `redis: down`, and the connection is retried every `retry_interval_s` until Redis is back.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import string
import threading
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass

logger = logging.getLogger(__name__)

KEY_PREFIX = "stepsearch:retrieve:v1:"
NORMALIZATIONS = ("whitespace", "squad")
_WS = re.compile(r"\s+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_query(query: str, mode: str = "whitespace") -> str:
    """Cache-key form of a query.

    whitespace (default): NFKC, strip, collapse runs of whitespace; the encoder sees exactly this text's meaning.
    squad: docs/method.md §1.3 (StepSearch's cache): lower-case, drop punctuation and a/an/the, collapse whitespace; more hits,
    but "The Who" and "who" then share an entry.
    """
    text = unicodedata.normalize("NFKC", query)
    if mode == "squad":
        text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    elif mode != "whitespace":
        raise ValueError(f"[cache] normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    return _WS.sub(" ", text).strip()


@dataclass(frozen=True)
class CacheConfig:
    redis_url: str | None = None  # None: LRU only
    ttl_s: int = 7 * 24 * 3600
    lru_size: int = 100_000
    normalization: str = "whitespace"
    socket_timeout_s: float = 0.25
    retry_interval_s: float = 1.0

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"[cache] normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.ttl_s <= 0 or self.lru_size < 0:
            raise ValueError(f"[cache] ttl_s must be > 0 and lru_size >= 0, got {self.ttl_s}, {self.lru_size}")


def redact_url(url: str) -> str:
    """redis://user:secret@host:port/0 -> redis://user:***@host:port/0 (health output must not leak passwords)."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class LRU:
    """Thread-safe least-recently-used map with a size cap."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: str, value: str) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class RedisLayer:
    """Redis with failure tolerance: any error marks it down; it is retried after `retry_interval_s`."""

    def __init__(self, cfg: CacheConfig):
        import redis

        self.cfg = cfg
        self.client = redis.Redis.from_url(cfg.redis_url, socket_timeout=cfg.socket_timeout_s,
                                           socket_connect_timeout=cfg.socket_timeout_s)
        self.up = False
        self.last_error: str | None = None
        self._next_try = 0.0
        self.ping()

    def ping(self) -> bool:
        try:
            self.client.ping()
            self._mark_up()
        except Exception as exc:  # noqa: BLE001 - any Redis failure means "serve uncached"
            self._mark_down(exc)
        return self.up

    def available(self) -> bool:
        """True when Redis is up, or when it is down but due for a reconnect attempt."""
        return self.up or time.monotonic() >= self._next_try

    def mget(self, keys: list[str]) -> list[str | None]:
        if not keys or not self.available():
            return [None] * len(keys)
        try:
            values = self.client.mget(keys)
            self._mark_up()
        except Exception as exc:  # noqa: BLE001
            self._mark_down(exc)
            return [None] * len(keys)
        return [v.decode() if v is not None else None for v in values]

    def set_many(self, items: dict[str, str]) -> None:
        if not items or not self.available():
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(key, value, ex=self.cfg.ttl_s)
            pipe.execute()
            self._mark_up()
        except Exception as exc:  # noqa: BLE001
            self._mark_down(exc)

    def _mark_up(self) -> None:
        if not self.up:
            logger.info("redis cache at %s is up", self.cfg.redis_url)
        self.up, self.last_error = True, None

    def _mark_down(self, exc: Exception) -> None:
        if self.up or self.last_error is None:
            logger.warning("redis cache at %s is down (%s); serving uncached until it is back", self.cfg.redis_url, exc)
        self.up, self.last_error = False, f"{type(exc).__name__}: {exc}"
        self._next_try = time.monotonic() + self.cfg.retry_interval_s
        self.client.connection_pool.disconnect()


class RetrievalCache:
    """get_many/put_many over (query, topk) for one index identity; counts hits and misses."""

    def __init__(self, cfg: CacheConfig, identity: str):
        self.cfg = cfg
        self.identity = identity
        self.lru = LRU(cfg.lru_size)
        self.redis = RedisLayer(cfg) if cfg.redis_url else None
        self.hits = self.misses = self.lru_hits = self.redis_hits = 0
        self._lock = threading.Lock()

    def key(self, query: str, topk: int) -> str:
        raw = f"{self.identity}\x00{topk}\x00{normalize_query(query, self.cfg.normalization)}"
        return KEY_PREFIX + hashlib.sha1(raw.encode()).hexdigest()

    def get_many(self, queries: list[str], topk: int) -> list[list | None]:
        """Cached hits per query (None on a miss), LRU then Redis. Blocking when Redis is configured."""
        keys = [self.key(q, topk) for q in queries]
        return self.finish(keys, self.lookup_redis(keys, self.lookup_lru(keys)))

    def lookup_lru(self, keys: list[str]) -> list[str | None]:
        """In-process layer only (cheap; safe on the event loop)."""
        found = [self.lru.get(k) for k in keys]
        with self._lock:
            self.lru_hits += sum(v is not None for v in found)
        return found

    def lookup_redis(self, keys: list[str], found: list[str | None]) -> list[str | None]:
        """Fill LRU misses from Redis (blocking I/O) and promote them into the LRU."""
        missing = [i for i, v in enumerate(found) if v is None]
        if not missing or self.redis is None:
            return found
        found = list(found)
        n_hits = 0
        for i, value in zip(missing, self.redis.mget([keys[i] for i in missing])):
            if value is not None:
                found[i] = value
                self.lru.put(keys[i], value)
                n_hits += 1
        with self._lock:
            self.redis_hits += n_hits
        return found

    def finish(self, keys: list[str], found: list[str | None]) -> list[list | None]:
        """Count hits/misses of a finished lookup and decode the JSON values."""
        n_hits = sum(v is not None for v in found)
        with self._lock:
            self.hits += n_hits
            self.misses += len(keys) - n_hits
        return [json.loads(v) if v is not None else None for v in found]

    def put_many(self, queries: list[str], topk: int, results: list[list]) -> None:
        items = {self.key(q, topk): json.dumps(hits) for q, hits in zip(queries, results)}
        for key, value in items.items():
            self.lru.put(key, value)
        if self.redis is not None:
            self.redis.set_many(items)

    def put_lru(self, queries: list[str], topk: int, results: list[list]) -> list[tuple[str, str]]:
        """Store results in the LRU only; returns (key, serialised hits) per query for `put_redis`."""
        items = [(self.key(q, topk), json.dumps(hits)) for q, hits in zip(queries, results)]
        for key, value in items:
            self.lru.put(key, value)
        return items

    def put_redis(self, items: dict[str, tuple[str, str]] | list[tuple[str, str]]) -> None:
        """Write (key, value) pairs from `put_lru` to Redis (blocking; no-op without Redis)."""
        if self.redis is not None:
            pairs = items.values() if isinstance(items, dict) else items
            self.redis.set_many(dict(pairs))

    def count(self, found: list[str | None]) -> None:
        """Count the hits and misses of a finished raw lookup (`finish` without decoding)."""
        n_hits = sum(v is not None for v in found)
        with self._lock:
            self.hits += n_hits
            self.misses += len(found) - n_hits

    def health(self) -> dict:
        if self.redis is None:
            return {"redis": "disabled", "lru_entries": len(self.lru)}
        if not self.redis.up and self.redis.available():
            self.redis.ping()  # /health doubles as a reconnect probe
        return {"redis": "up" if self.redis.up else "down", "redis_url": redact_url(self.cfg.redis_url),
                "redis_error": self.redis.last_error, "lru_entries": len(self.lru)}

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "lru_hits": self.lru_hits, "redis_hits": self.redis_hits,
                "hit_rate": self.hits / total if total else 0.0}
