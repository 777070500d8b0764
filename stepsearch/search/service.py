"""The work behind `POST /retrieve`, after validation: backends (local index or Serper), the cache, and `execute`,
which both request paths (fast lane and FastAPI) call to turn a validated `RetrieveCall` into the reply.

    backend = open_backend(cfg); backend.start()
    service = RetrievalService(cfg, backend)
    status, body = await execute(service, call)     # 200 + result JSON, or 500/502/504 + {"detail": ...}

Local search runs on one owner thread (`batcher.MicroBatcher`) that coalesces concurrent requests. Cache hits are
spliced into the reply from their stored JSON (no decoding, no thread hop when the in-process LRU has them).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections import deque

import numpy as np

from stepsearch.search.batcher import BatcherConfig, GuardedPipelineBatcher, MicroBatcher
from stepsearch.search.cache import CacheConfig, RetrievalCache
from stepsearch.search.index import DenseRetriever, LoadedIndex, LoadOptions, load_index
from stepsearch.search.online import SerperBackend, SerperConfig, UpstreamError
from stepsearch.search.request_check import RequestError, RetrieveCall
from stepsearch.search.server_config import ServerConfig

logger = logging.getLogger("stepsearch.search.server")


# ---------------------------------------------------------------- backends
def retriever_encoder(retriever):
    """The dense query encoder of a retriever (also inside hybrid), or None for BM25."""
    return getattr(retriever, "encoder", None) or getattr(getattr(retriever, "dense", None), "encoder", None)


class LocalBackend:
    """A local index searched on one owner thread; rows come from the memory-mapped corpus table."""

    def __init__(self, loaded: LoadedIndex, batcher_cfg: BatcherConfig, guard_pipeline: bool = True,
                 guard_workers: int = 2, encode_workers: int = 1):
        self.loaded = loaded
        self.identity = loaded.identity
        self.batcher_cfg = batcher_cfg
        self.guard_pipeline, self.guard_workers = guard_pipeline, guard_workers
        self.encode_workers = encode_workers  # sorted mode: chunks encoded on this many threads at once
        self.batcher: MicroBatcher | None = None
        self.warm_up_state = "off"  # the bf16 kernel warm-up (start_bf16_warm_up): off | running | done | failed
        self._warm_up_thread: threading.Thread | None = None

    def start(self) -> None:
        dense = self.loaded.retriever
        mode = dense.encoder.config.mode if isinstance(dense, DenseRetriever) else None
        if self.guard_pipeline and mode == "guarded":
            def fallback(queries: list[str], topk: int):
                res = dense.search_exact(queries, topk)
                return res.ids, res.scores

            self.batcher = GuardedPipelineBatcher(dense.search_first, fallback, self.batcher_cfg,
                                                  first_workers=self.guard_workers)
        elif mode == "sorted" and self.encode_workers > 1:
            self.batcher = GuardedPipelineBatcher(self.search_ids, None, self.batcher_cfg,
                                                  first_workers=self.encode_workers)
        else:
            self.batcher = MicroBatcher(self.search_ids, self.batcher_cfg)

    def search_ids(self, queries: list[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """(N,) queries -> ids (N, topk) int64, scores (N, topk) float32. Runs on the owner thread only."""
        res = self.loaded.retriever.search(queries, topk)
        return res.ids, res.scores

    def hits(self, ids: np.ndarray, scores: np.ndarray) -> list[list[dict]]:
        """ids/scores (N, k) -> per query [{"document": row, "score": float}] (id -1 = no hit, dropped)."""
        valid = ids >= 0
        rows = iter(self.loaded.corpus.rows(ids[valid]))
        return [[{"document": next(rows), "score": float(s)} for i, s, ok in zip(ids[q], scores[q], valid[q]) if ok]
                for q in range(ids.shape[0])]

    async def search(self, queries: list[str], topk: int) -> list[list[dict]]:
        ids, scores = await self.batcher.submit(queries, topk)
        return self.hits(ids, scores)

    def warm_up(self) -> None:
        """Run once before serving, so the first request does not pay first-call costs: the encoder's first forward
        (allocations, kernel set-up), a corpus lookup, and a search wherever one is cheap. An exhaustive (Flat-type)
        index is not searched: that would read every stored vector (seconds per GB) and delay the first answer by
        as much; its first search has no set-up cost of its own to take off the first request."""
        from stepsearch.search.index import is_exhaustive

        retriever = self.loaded.retriever
        dense = retriever if isinstance(retriever, DenseRetriever) else getattr(retriever, "dense", None)
        if dense is not None and is_exhaustive(dense.index):
            dense.encoder.encode_queries(["warm-up query"])
            if retriever is not dense:  # hybrid: its BM25 half
                retriever.bm25.search(["warm-up query"], 1)
        else:
            retriever.search(["warm-up query"], 1)
        self.loaded.corpus.rows([0])

    def start_bf16_warm_up(self) -> None:
        """Guarded mode: build the bf16 kernels for the common batch shapes (`Encoder.warm_up_bf16`, 3-5 s of one
        core) on a daemon thread while the server already answers, so a start is not held up by it; a request
        meanwhile pays the kernel build of a shape not yet seen (~30% of that batch). /health's `warm_up` says
        when it is done. No-op in other modes."""
        encoder = self.encoder()
        if encoder is None or encoder.fast_model is None:
            return

        def run() -> None:
            t0 = time.perf_counter()
            try:
                shapes = encoder.warm_up_bf16()
            except Exception:  # the server keeps serving: an unseen shape is built on its first request
                self.warm_up_state = "failed"
                logger.exception("bf16 warm-up failed")
                return
            self.warm_up_state = "done"
            logger.info("warmed up %d bf16 batch shapes in %.1f s", shapes, time.perf_counter() - t0)

        self.warm_up_state = "running"
        self._warm_up_thread = threading.Thread(target=run, name="bf16-warm-up", daemon=True)
        self._warm_up_thread.start()

    def search_sync(self, queries: list[str], topk: int) -> list[list[dict]]:
        """The same encode+search+lookup, in-process, without HTTP or the batcher (benchmark baseline)."""
        return self.hits(*self.search_ids(queries, topk))

    def encoder(self):
        """The dense query encoder (also inside hybrid), or None for BM25."""
        return retriever_encoder(self.loaded.retriever)

    def health(self) -> dict:
        m = self.loaded.manifest
        encoder = self.encoder()
        return {"backend": "local", "method": self.loaded.method, "num_passages": len(self.loaded.corpus),
                "encoder": (m.get("encoder") or {}).get("model"), "index_factory": m.get("index_factory"),
                "encoder_mode": encoder.config.mode if encoder is not None else None,
                "encoder_backend": encoder.config.backend if encoder is not None else None,
                "encoder_packs_tokens": encoder.packs_tokens if encoder is not None else None,
                "encode_workers": self.encode_workers, "warm_up": self.warm_up_state,
                "guard_eps": encoder.guard_eps if encoder is not None else None, "identity": self.identity,
                **self.dense_settings()}

    def dense_settings(self) -> dict:
        """torch threads, IVF nprobe and re-rank candidates in effect (None where they do not apply)."""
        retriever = self.loaded.retriever
        dense = retriever if isinstance(retriever, DenseRetriever) else getattr(retriever, "dense", None)
        if dense is None:
            return {}
        import torch

        return {"torch_threads": torch.get_num_threads(), "nprobe": dense.nprobe,
                "rerank_candidates": dense.rerank_candidates, "gpu_search": dense.gpu_search}

    def batch_stats(self) -> dict:
        sizes = np.asarray(self.batcher.batch_sizes if self.batcher else [], dtype=np.float64)
        if sizes.size == 0:
            return {"batches": 0}
        search_ms = np.asarray(self.batcher.batch_ms, dtype=np.float64)
        guard = getattr(self.loaded.retriever, "guard_stats", lambda: None)()  # guarded mode: fp32 fallbacks
        pipeline = {}
        if isinstance(self.batcher, GuardedPipelineBatcher):  # the fp32 owner thread's share of the work
            fb = np.asarray(self.batcher.fallback_batch_sizes, dtype=np.float64)
            pipeline = {"pipeline": {"fallback_batches": int(fb.size), "fallback_queries": int(fb.sum()),
                                     "fallback_busy_s": self.batcher.fallback_busy_s}}
        return {**({"guard": guard} if guard else {}), **pipeline, "batches": self.batcher.num_batches,
                "mean": float(sizes.mean()), "p50": float(np.median(sizes)), "max": int(sizes.max()),
                "search_ms_p50": float(np.percentile(search_ms, 50)),
                "search_ms_p99": float(np.percentile(search_ms, 99)), "busy_s": self.batcher.busy_s,
                "coalesce": self.batcher_cfg.coalesce,
                "max_batch_queries": self.batcher_cfg.max_batch_queries, "max_wait_ms": self.batcher_cfg.max_wait_ms}

    async def aclose(self) -> None:
        if self._warm_up_thread is not None:  # seconds at most; it runs the encoder the batcher shares
            await asyncio.to_thread(self._warm_up_thread.join)
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)


class OnlineBackend:
    """Adapter giving SerperBackend the LocalBackend interface."""

    def __init__(self, serper: SerperBackend):
        self.serper = serper
        self.identity = serper.identity

    def start(self) -> None:
        pass

    async def search(self, queries: list[str], topk: int) -> list[list[dict]]:
        return await self.serper.search(queries, topk)

    def health(self) -> dict:
        return self.serper.health()

    def batch_stats(self) -> dict:
        return {"batches": 0, "note": "online backend: one upstream call per query"}

    async def aclose(self) -> None:
        await self.serper.aclose()


def open_backend(cfg: ServerConfig):
    """Load the index (or online client) for cfg; IndexLoadError/ValueError explain what is wrong."""
    if cfg.online == "serper":
        return OnlineBackend(SerperBackend(SerperConfig.from_args(cfg.serper_api_key, url=cfg.serper_url)))
    with module_hidden("sklearn"):
        loaded = open_index(cfg)
    workers = 1
    if loaded.method != "bm25":
        import torch

        mode = retriever_encoder(loaded.retriever).config.mode
        workers = encode_workers(cfg, mode, loaded.method)
        torch.set_num_threads(1 if workers > 1 else torch_threads(cfg, mode))
    return LocalBackend(loaded, BatcherConfig(cfg.max_batch_queries, cfg.max_wait_ms, cfg.coalesce),
                        guard_pipeline=cfg.guard_pipeline, guard_workers=cfg.guard_workers, encode_workers=workers)


@contextlib.contextmanager
def module_hidden(name: str):
    """While open, `importlib.util.find_spec(name)` says the module is not installed (sys.modules[name] = None),
    unless it is imported already. The server opens the index under `module_hidden("sklearn")`: transformers'
    generation code imports scikit-learn when it is installed (for assisted decoding, which a retrieval server never
    runs), ~2 s of the encoder's load on 2 cores; hidden, the encoder loads and encodes exactly the same."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None
    try:
        yield
    finally:
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]


def open_index(cfg: ServerConfig) -> LoadedIndex:
    return load_index(cfg.index_dir, LoadOptions(method=cfg.method, encoder=cfg.encoder,
                                                   encoder_mode=cfg.encoder_mode, device=cfg.device,
                                                   corpus=cfg.corpus, guard_eps=cfg.guard_eps,
                                                   guard_order=cfg.guard_order, faiss_gpu=cfg.faiss_gpu,
                                                   gpu_storage=cfg.gpu_storage,
                                                   gpu_shard=not cfg.faiss_gpu_replicate, nprobe=cfg.nprobe,
                                                   rerank_candidates=cfg.rerank_candidates,
                                                   encoder_backend=cfg.encoder_backend,
                                                   pack_tokens=cfg.pack_tokens))


def torch_threads(cfg: ServerConfig, encoder_mode: str) -> int:
    """Intra-op torch threads for query encoding: cfg.torch_threads when > 0; else (auto) $OMP_NUM_THREADS when set
    to a positive int, 1 for the guarded pipeline (it runs `guard_workers` bf16 threads + an fp32 thread), and
    otherwise every core this process may run on (os.sched_getaffinity: idle cores are used, not left to one thread).
    """
    if cfg.torch_threads > 0:
        return cfg.torch_threads
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    if encoder_mode == "guarded" and cfg.guard_pipeline:
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def encode_workers(cfg: ServerConfig, encoder_mode: str, method: str) -> int:
    """Threads encoding at once for a dense index in `sorted` mode on CPU (1 torch thread each): cfg.encode_workers
    when > 0 (default 1: one owner thread), else (0, auto) the thread budget torch_threads would give one owner
    thread, so an explicit --torch_threads or $OMP_NUM_THREADS still bounds the cores the server takes. 1 for every
    other method, mode and device (hybrid keeps one owner thread: BM25 search is not shared between threads)."""
    if method != "dense" or encoder_mode != "sorted" or cfg.device != "cpu":
        return 1
    return cfg.encode_workers if cfg.encode_workers > 0 else torch_threads(cfg, encoder_mode)


# ---------------------------------------------------------------- the service
class RetrievalService:
    """Cache lookup, de-duplication, backend search, cache fill, statistics."""

    def __init__(self, cfg: ServerConfig, backend):
        self.cfg = cfg
        self.backend = backend
        self.cache = RetrievalCache(CacheConfig(cfg.redis_url, cfg.cache_ttl_s, cfg.lru_size, cfg.cache_normalization),
                                    backend.identity)
        self.started_at = time.time()
        self.requests = self.queries = self.errors = 0
        self.latencies_ms: deque[float] = deque(maxlen=20000)
        # Redis writes of fresh results, drained by one background task in one pipeline per round (all on the
        # event loop, so no lock): a coalesced batch of 32 single-query requests costs one Redis round trip
        self._redis_pending: list[tuple[str, str]] = []
        self._redis_writer: asyncio.Task | None = None

    def lookup_raw(self, queries: list[str], topk: int) -> tuple[list[str], list[str | None]]:
        """(keys, pre-serialised hits per query or None) from the in-process LRU only; cheap, on the event loop."""
        keys = [self.cache.key(q, topk) for q in queries]
        return keys, self.cache.lookup_lru(keys)

    async def retrieve_raw(self, queries: list[str], topk: int, keys: list[str],
                           found: list[str | None]) -> list[str]:
        """Each query's hits as a JSON array string (the cache's stored form), filling the LRU misses `found`
        from Redis (a worker thread) and then from the backend. Redis writes run in the background."""
        if self.cache.redis is not None and None in found:
            found = await asyncio.to_thread(self.cache.lookup_redis, keys, found)
        self.cache.count(found)
        missing = list(dict.fromkeys(q for q, v in zip(queries, found) if v is None))  # unique, in order
        if not missing:
            return found
        hits = await self.backend.search(missing, topk)
        fresh = dict(zip(missing, self.cache.put_lru(missing, topk, hits)))
        if self.cache.redis is not None:
            self._redis_pending.extend(fresh.values())
            if self._redis_writer is None:
                self._redis_writer = asyncio.ensure_future(self._write_redis())
        return [fresh[q][1] if v is None else v for q, v in zip(queries, found)]

    async def _write_redis(self) -> None:
        """Drain `_redis_pending` to Redis on a worker thread until it stays empty (RedisLayer swallows errors)."""
        try:
            while self._redis_pending:
                items, self._redis_pending = self._redis_pending, []
                await asyncio.to_thread(self.cache.put_redis, items)
        finally:
            self._redis_writer = None

    def record(self, n_queries: int, latency_ms: float) -> None:
        self.requests += 1
        self.queries += n_queries
        self.latencies_ms.append(latency_ms)

    def health(self) -> dict:
        cache = self.cache.health()
        degraded = ["redis down: serving uncached"] if cache["redis"] == "down" else []
        return {"status": "degraded" if degraded else "ok", "problems": degraded, **self.backend.health(),
                "cache": cache, "uptime_s": round(time.time() - self.started_at, 1)}

    def stats(self) -> dict:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        pct = {f"p{p}": float(np.percentile(lat, p)) for p in (50, 90, 99)} if lat.size else {}
        return {"requests": self.requests, "queries": self.queries, "errors": self.errors,
                "cache": self.cache.stats(), "latency_ms": {**pct, "window": int(lat.size)},
                "batch_sizes": self.backend.batch_stats()}


def raw_body(per_query: list[str], return_scores: bool) -> bytes:
    """Response body from each query's hits as stored in the cache (JSON array strings): spliced as they are
    when scores are wanted, else decoded and reduced to the bare document rows."""
    if return_scores:
        return ('{"result":[' + ",".join(per_query) + "]}").encode()
    docs = [[h["document"] for h in json.loads(v)] for v in per_query]
    return json.dumps({"result": docs}, ensure_ascii=False).encode()


async def execute(service: RetrievalService, call: RetrieveCall) -> bytes:
    """The reply body for a validated call; RequestError(504 | 502 | 500) when the search times out or fails.
    An all-cache-hit call answers on the event loop without a task, a thread or JSON decoding."""
    queries, topk, return_scores = call
    t0 = time.perf_counter()
    keys, found = service.lookup_raw(queries, topk)
    if None not in found:
        service.cache.count(found)
        body = raw_body(found, return_scores)
    else:
        timeout_s = service.cfg.request_timeout_s
        try:
            per_query = await asyncio.wait_for(service.retrieve_raw(queries, topk, keys, found), timeout_s)
        except asyncio.TimeoutError:
            service.errors += 1
            raise RequestError(504, f"retrieval took longer than {timeout_s}s (overloaded?)") from None
        except UpstreamError as exc:
            service.errors += 1
            raise RequestError(502, f"online search failed: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a failed search must not take the server down
            service.errors += 1
            logger.exception("retrieve failed")
            raise RequestError(500, f"retrieval failed: {type(exc).__name__}: {exc}") from None
        body = raw_body(per_query, return_scores)
    service.record(len(queries), (time.perf_counter() - t0) * 1000)
    return body
