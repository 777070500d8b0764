"""Retrieval server: `python -m stepsearch.search.server --index_dir DIR [--host 127.0.0.1] [--port 8000]
[--redis_url redis://127.0.0.1:6379/0]`, or `--online serper` for web search behind the same contract.

`POST /retrieve` keeps Search-R1's contract (SPEC §3.2):
    request  {"queries": [str, ...], "topk": 3, "return_scores": true}
    response {"result": [[{"document": row, "score": float}, ...] per query]}   (return_scores true)
             {"result": [[row, ...] per query]}                                (return_scores false)
Every row has `id`, `title`, `text`, `contents` ('"Title"\\ntext') plus the corpus' original fields.
`GET /health` (no auth) and `GET /stats` (requests, queries, cache hits/misses, latency percentiles, batch sizes).

Layout: `main` parses flags into a frozen `ServerConfig`, opens the backend (refusing a missing, stale or
mismatched index before the port is bound), then `create_app` wires the routes to a `RetrievalService` that does
validation-free work (cache, dedupe, backend call, formatting). Local search runs on one owner thread
(`batcher.MicroBatcher`) that coalesces concurrent requests.

Fast lane (issue 8): `FastLane` wraps the FastAPI app as a plain ASGI callable. A well-formed, authorised
`POST /retrieve` is answered there without FastAPI's per-request machinery (routing, dependency injection, pydantic
models): the body is parsed once with `json`, checked with the same rules, and answered from pre-serialised cache
entries (a cache hit never decodes or re-encodes JSON and never leaves the event loop). Anything else (bad input,
a wrong token, other routes) goes to FastAPI unchanged, so every error message stays the same.
`--no_fast_lane` serves everything through FastAPI.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from stepsearch.search.batcher import BatcherConfig, GuardedPipelineBatcher, MicroBatcher
from stepsearch.search.cache import CacheConfig, RetrievalCache
from stepsearch.search.client import DEFAULT_MAX_QUERY_CHARS, TOKEN_ENV
from stepsearch.search.index import DenseRetriever, IndexLoadError, LoadedIndex, LoadOptions, load_index
from stepsearch.search.online import SerperBackend, SerperConfig, UpstreamError

logger = logging.getLogger("stepsearch.search.server")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs, validated once at start-up."""

    index_dir: str | None = None
    online: str | None = None  # None (local index) or "serper"
    host: str = "127.0.0.1"
    port: int = 8000
    method: str | None = None  # dense | bm25 | hybrid; None: dense when built
    encoder: str | None = None  # must match the manifest's encoder
    # fast: guarded bf16 + fp32 fallback on CPUs with native bf16 (else sorted fp32), fp16 on GPU; exact: fp32
    encoder_mode: str = "fast"
    guard_eps: float | None = None  # guarded: score gap that triggers the fp32 fallback (None: calibrated value)
    guard_order: bool = False  # guarded: also keep the fp32 top-k order, not only the id set
    device: str = "cpu"
    # dense flat index on every visible GPU (Search-R1's --faiss_gpu), vectors stored as gpu_storage (fp16 halves
    # wiki-18/e5 to 32 GB); see gpu_index.TorchFlatIndex
    faiss_gpu: bool = False
    gpu_storage: str = "fp16"
    corpus: str | None = None  # if given, must match the manifest's corpus sha256
    redis_url: str | None = None
    cache_ttl_s: int = 7 * 24 * 3600
    lru_size: int = 100_000
    cache_normalization: str = "whitespace"
    default_topk: int = 3
    max_topk: int = 100
    max_queries: int = 4096
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS
    max_batch_queries: int = 256
    max_wait_ms: float = 2.0
    coalesce: bool = True
    # guarded mode: run the bf16 pass and the fp32 fallback pass on two owner threads at once
    # (batcher.GuardedPipelineBatcher); off: both on one thread, one after the other
    guard_pipeline: bool = True
    # guarded pipeline: threads running the bf16 pass (1 torch thread each, plus the fp32 thread); 2 measured best
    # on the 2-core machine (bench/results/retrieval.md); on a dedicated many-core node give it more
    guard_workers: int = 2
    # torch intra-op threads for query encoding; 0 leaves torch alone (it follows OMP_NUM_THREADS). 1 keeps small
    # query batches fast when the node's cores are shared with the trainer/rollout (oversubscribed OpenMP threads
    # stall each other). The CLI default is 1 unless OMP_NUM_THREADS is set, which then wins.
    torch_threads: int = 1
    # Python GIL switch interval for the server process (default 5 ms; see main)
    gil_switch_interval_ms: float = 0.5
    # a /retrieve that takes longer answers 504 (the client retries it)
    request_timeout_s: float = 120.0
    # answer well-formed /retrieve requests in a plain ASGI handler in front of FastAPI (see FastLane)
    fast_lane: bool = True
    # guarded mode: build the bf16 kernels for the common batch shapes at start-up (Encoder.warm_up_bf16)
    warm_up: bool = True
    token: str | None = None
    serper_api_key: str | None = None
    serper_url: str = "https://google.serper.dev/search"

    def __post_init__(self):
        if (self.index_dir is None) == (self.online is None):
            raise ValueError("[server] give exactly one of --index_dir DIR or --online serper")
        if self.online not in (None, "serper"):
            raise ValueError(f"[server] --online must be 'serper', got {self.online!r}")
        for name in ("default_topk", "max_topk", "max_queries", "max_query_chars", "request_timeout_s",
                     "gil_switch_interval_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"[server] --{name} must be positive, got {getattr(self, name)}")
        if self.guard_workers <= 0:
            raise ValueError(f"[server] --guard_workers must be positive, got {self.guard_workers}")
        if self.gpu_storage not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"[server] --gpu_storage must be fp16, bf16 or fp32, got {self.gpu_storage!r}")
        if self.torch_threads < 0:
            raise ValueError(f"[server] --torch_threads must be >= 0, got {self.torch_threads}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"[server] --default_topk ({self.default_topk}) exceeds --max_topk ({self.max_topk})")


# ---------------------------------------------------------------- request / response models (Search-R1 contract)
class RetrieveRequest(BaseModel):
    """`topk_retrieval` and other extra fields sent by Search-R1 clients are ignored."""

    model_config = ConfigDict(extra="ignore")
    queries: list[StrictStr]
    topk: StrictInt | None = None
    return_scores: StrictBool = False


class ScoredDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    document: dict
    score: float


class RetrieveResponse(BaseModel):
    """`result[i]` is query i's hits: ScoredDocument when return_scores, else bare document rows."""

    result: list[list[ScoredDocument | dict]]


def validate_request(req: RetrieveRequest, cfg: ServerConfig) -> tuple[list[str], int]:
    """Checks pydantic cannot express with the server's caps; raises HTTPException(422) naming the field."""
    queries, topk = req.queries, cfg.default_topk if req.topk is None else req.topk
    if not queries:
        raise HTTPException(422, "queries is empty; send at least one query string")
    if len(queries) > cfg.max_queries:
        raise HTTPException(422, f"too many queries: {len(queries)} > max {cfg.max_queries}; split the request")
    if not 1 <= topk <= cfg.max_topk:
        raise HTTPException(422, f"topk must be in [1, {cfg.max_topk}], got {topk}")
    for i, q in enumerate(queries):
        if not q.strip():
            raise HTTPException(422, f"queries[{i}] is empty or whitespace; every query needs text")
        if len(q) > cfg.max_query_chars:
            raise HTTPException(422, f"queries[{i}] has {len(q)} characters > max {cfg.max_query_chars}")
    return queries, topk


# ---------------------------------------------------------------- backends
class LocalBackend:
    """A local index searched on one owner thread; rows come from the memory-mapped corpus table."""

    def __init__(self, loaded: LoadedIndex, batcher_cfg: BatcherConfig, guard_pipeline: bool = True,
                 guard_workers: int = 2):
        self.loaded = loaded
        self.identity = loaded.identity
        self.batcher_cfg = batcher_cfg
        self.guard_pipeline, self.guard_workers = guard_pipeline, guard_workers
        self.batcher: MicroBatcher | None = None

    def start(self) -> None:
        dense = self.loaded.retriever
        if self.guard_pipeline and isinstance(dense, DenseRetriever) and dense.encoder.config.mode == "guarded":
            def fallback(queries: list[str], topk: int):
                res = dense.search_exact(queries, topk)
                return res.ids, res.scores

            self.batcher = GuardedPipelineBatcher(dense.search_first, fallback, self.batcher_cfg,
                                                  first_workers=self.guard_workers)
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

    def search_sync(self, queries: list[str], topk: int) -> list[list[dict]]:
        """The same encode+search+lookup, in-process, without HTTP or the batcher (benchmark baseline)."""
        return self.hits(*self.search_ids(queries, topk))

    def encoder(self):
        """The dense query encoder (also inside hybrid), or None for BM25."""
        return getattr(self.loaded.retriever, "encoder", None) or getattr(
            getattr(self.loaded.retriever, "dense", None), "encoder", None)

    def health(self) -> dict:
        m = self.loaded.manifest
        encoder = self.encoder()
        return {"backend": "local", "method": self.loaded.method, "num_passages": len(self.loaded.corpus),
                "encoder": (m.get("encoder") or {}).get("model"), "index_factory": m.get("index_factory"),
                "encoder_mode": encoder.config.mode if encoder is not None else None,
                "guard_eps": encoder.guard_eps if encoder is not None else None, "identity": self.identity}

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
    loaded = load_index(cfg.index_dir, LoadOptions(method=cfg.method, encoder=cfg.encoder,
                                                   encoder_mode=cfg.encoder_mode, device=cfg.device,
                                                   corpus=cfg.corpus, guard_eps=cfg.guard_eps,
                                                   guard_order=cfg.guard_order, faiss_gpu=cfg.faiss_gpu,
                                                   gpu_storage=cfg.gpu_storage))
    if loaded.method != "bm25" and cfg.torch_threads > 0:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    return LocalBackend(loaded, BatcherConfig(cfg.max_batch_queries, cfg.max_wait_ms, cfg.coalesce),
                        guard_pipeline=cfg.guard_pipeline, guard_workers=cfg.guard_workers)


# ---------------------------------------------------------------- the service (the work behind /retrieve)
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

    async def retrieve(self, queries: list[str], topk: int) -> list[list[dict]]:
        cached = await self.cached(queries, topk)
        missing = list(dict.fromkeys(q for q, hit in zip(queries, cached) if hit is None))  # unique, in order
        if missing:
            fresh = dict(zip(missing, await self.backend.search(missing, topk)))
            await self._off_loop(self.cache.put_many, missing, topk, [fresh[q] for q in missing])
            cached = [fresh[q] if hit is None else hit for q, hit in zip(queries, cached)]
        return cached

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

    async def cached(self, queries: list[str], topk: int) -> list[list | None]:
        """LRU on the event loop; only its misses go to Redis, on a worker thread (blocking I/O)."""
        keys = [self.cache.key(q, topk) for q in queries]
        found = self.cache.lookup_lru(keys)
        if self.cache.redis is not None and None in found:
            found = await asyncio.to_thread(self.cache.lookup_redis, keys, found)
        return self.cache.finish(keys, found)

    async def _off_loop(self, fn, *args):
        return await asyncio.to_thread(fn, *args) if self.cache.redis is not None else fn(*args)

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


# ---------------------------------------------------------------- app
def get_service(request: Request) -> RetrievalService:
    return request.app.state.service


def check_token(request: Request) -> None:
    """Bearer-token guard; a no-op unless the server was started with a token."""
    token = request.app.state.config.token
    if token is None:
        return
    got = request.headers.get("authorization", "")
    if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})


def format_result(hits: list[list[dict]], return_scores: bool) -> dict:
    if return_scores:
        return {"result": hits}
    return {"result": [[h["document"] for h in per_query] for per_query in hits]}


def raw_body(per_query: list[str], return_scores: bool) -> bytes:
    """Response body from each query's hits as stored in the cache (JSON array strings): spliced as they are
    when scores are wanted, else decoded and reduced to the bare document rows."""
    if return_scores:
        return ('{"result":[' + ",".join(per_query) + "]}").encode()
    docs = [[h["document"] for h in json.loads(v)] for v in per_query]
    return json.dumps({"result": docs}, ensure_ascii=False).encode()


def parse_fast(body: bytes, cfg: ServerConfig) -> tuple[list[str], int, bool] | None:
    """(queries, topk, return_scores) when `body` is a request the FastAPI route would accept as it is; None
    for anything else (which then goes to FastAPI for its exact error message). Mirrors RetrieveRequest
    (strict types, extra fields ignored) and validate_request."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(req, dict):
        return None
    queries, topk, scores = req.get("queries"), req.get("topk"), req.get("return_scores", False)
    if type(queries) is not list or not all(type(q) is str for q in queries) or type(scores) is not bool:
        return None
    topk = cfg.default_topk if topk is None else topk
    if type(topk) is not int or not 1 <= topk <= cfg.max_topk or not 1 <= len(queries) <= cfg.max_queries:
        return None
    if any(len(q) > cfg.max_query_chars or not q.strip() for q in queries):
        return None
    return queries, topk, scores


class FastLane:
    """ASGI wrapper: answers well-formed, authorised `POST /retrieve` requests itself (see the module docstring);
    passes everything else, lifespan included, to the FastAPI `app` untouched."""

    def __init__(self, app: FastAPI, cfg: ServerConfig):
        self.app, self.cfg = app, cfg
        self.auth = f"Bearer {cfg.token}".encode() if cfg.token is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/retrieve" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        ctype = headers.get(b"content-type", b"application/json")
        parsed = parse_fast(body, self.cfg) if ctype.startswith(b"application/json") else None
        if parsed is None or (self.auth is not None and not hmac.compare_digest(headers.get(b"authorization", b""),
                                                                               self.auth)):
            return await self.app(scope, _replay(body, receive), send)
        await self.answer(parsed, send)

    async def answer(self, parsed: tuple[list[str], int, bool], send) -> None:
        queries, topk, return_scores = parsed
        service: RetrievalService = self.app.state.service
        t0 = time.perf_counter()
        keys, found = service.lookup_raw(queries, topk)
        status, body = 200, None
        if None not in found:  # all cache hits: no task, no thread, no JSON decoding
            service.cache.count(found)
            body = raw_body(found, return_scores)
        else:
            try:
                per_query = await asyncio.wait_for(service.retrieve_raw(queries, topk, keys, found),
                                                   self.cfg.request_timeout_s)
                body = raw_body(per_query, return_scores)
            except asyncio.TimeoutError:
                status, detail = 504, f"retrieval took longer than {self.cfg.request_timeout_s}s (overloaded?)"
            except UpstreamError as exc:
                status, detail = 502, f"online search failed: {exc}"
            except Exception as exc:  # noqa: BLE001 - a failed search must not take the server down
                logger.exception("retrieve failed")
                status, detail = 500, f"retrieval failed: {type(exc).__name__}: {exc}"
            if status != 200:
                service.errors += 1
                body = json.dumps({"detail": detail}).encode()
        if status == 200:
            service.record(len(queries), (time.perf_counter() - t0) * 1000)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    """An ASGI `receive` that yields the already-read body once, then defers to the real one."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed JSON -> 400, schema errors -> 422; the detail names the field ('queries[2]') and the problem."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"detail": "malformed JSON body: " + str(errors[0].get("ctx", {}).get("error", ""))},
                            status_code=400)
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = "".join(f"[{x}]" if x.isdigit() else (f".{x}" if i else x) for i, x in enumerate(loc)) or "body"
        parts.append(f"{field}: {e.get('msg')} (got {e.get('input')!r:.80})")
    return JSONResponse({"detail": "; ".join(parts), "errors": json.loads(json.dumps(errors, default=str))},
                        status_code=422)


def create_app(cfg: ServerConfig, backend) -> FastAPI:
    """App over an opened backend (`open_backend(cfg)`); the batcher and cache start in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        service = RetrievalService(cfg, backend)
        app.state.service = service
        if isinstance(backend, LocalBackend):
            encoder = backend.encoder()
            if cfg.warm_up and encoder is not None:  # bf16 kernels for the common shapes (guarded mode), ~2-5 s
                shapes = await asyncio.to_thread(encoder.warm_up_bf16)
                logger.info("warmed up %d bf16 batch shapes", shapes)
            await backend.search(["warm-up query"], 1)  # first encode allocates; keep it off the first request
        logger.info("retrieval server ready: %s", backend.health())
        yield
        await backend.aclose()

    app = FastAPI(title="StepSearch retrieval", lifespan=lifespan)
    app.state.config = cfg
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.post("/retrieve", response_model=RetrieveResponse, dependencies=[Depends(check_token)])
    async def retrieve(req: RetrieveRequest, service: RetrievalService = Depends(get_service)) -> Response:
        t0 = time.perf_counter()
        queries, topk = validate_request(req, cfg)
        try:
            hits = await asyncio.wait_for(service.retrieve(queries, topk), cfg.request_timeout_s)
        except asyncio.TimeoutError as exc:
            service.errors += 1
            raise HTTPException(504, f"retrieval took longer than {cfg.request_timeout_s}s (overloaded?)") from exc
        except UpstreamError as exc:
            service.errors += 1
            raise HTTPException(502, f"online search failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a failed search must not take the server down
            service.errors += 1
            logger.exception("retrieve failed")
            raise HTTPException(500, f"retrieval failed: {type(exc).__name__}: {exc}") from exc
        body = json.dumps(format_result(hits, req.return_scores), ensure_ascii=False).encode()
        service.record(len(queries), (time.perf_counter() - t0) * 1000)
        return Response(body, media_type="application/json")

    @app.get("/health")
    async def health(service: RetrievalService = Depends(get_service)) -> dict:
        return await asyncio.to_thread(service.health)

    @app.get("/stats", dependencies=[Depends(check_token)])
    async def stats(service: RetrievalService = Depends(get_service)) -> dict:
        return service.stats()

    return app


# ---------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    d = ServerConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description="StepSearch retrieval server (Search-R1 /retrieve contract)")
    p.add_argument("--index_dir", help="index folder written by stepsearch.search.build_index")
    p.add_argument("--online", choices=("serper",), help="serve web search results instead of a local index")
    p.add_argument("--host", default="127.0.0.1", help="bind address; keep 127.0.0.1 unless you set a token")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--method", choices=("dense", "bm25", "hybrid"), help="default: dense if the index has it")
    p.add_argument("--encoder", help="query encoder; must match the index manifest (default: the manifest's)")
    p.add_argument("--encoder_mode", default=d["encoder_mode"].default,
                   help="query encoder path: fast (default: guarded bf16 with fp32 fallback on CPUs with native bf16, "
                        "else sorted; fp16 on GPU), guarded, sorted, fp16, exact (Search-R1's fp32 path)")
    p.add_argument("--guard_eps", type=float, help="guarded mode: bf16 score gap below which a query is re-encoded "
                                                   "in fp32 (default: the model's calibrated value)")
    p.add_argument("--guard_order", action="store_true", help="guarded mode: keep fp32's top-k order, not only its set")
    p.add_argument("--device", default="cpu", help="query encoder device: cpu or cuda[:N]")
    p.add_argument("--faiss_gpu", action="store_true", help="put the dense (flat) index on every visible GPU")
    p.add_argument("--gpu_storage", default="fp16", choices=("fp16", "bf16", "fp32"),
                   help="--faiss_gpu: how the vectors are stored on the GPU")
    p.add_argument("--corpus", help="corpus file; refuse to start unless it matches the manifest's sha256")
    p.add_argument("--redis_url", help="e.g. redis://127.0.0.1:6379/0; omit for the in-process LRU only")
    p.add_argument("--cache_ttl_s", type=int, default=d["cache_ttl_s"].default)
    p.add_argument("--lru_size", type=int, default=d["lru_size"].default)
    p.add_argument("--cache_normalization", default="whitespace", choices=("whitespace", "squad"))
    p.add_argument("--default_topk", type=int, default=3)
    p.add_argument("--max_topk", type=int, default=d["max_topk"].default)
    p.add_argument("--max_queries", type=int, default=d["max_queries"].default)
    p.add_argument("--max_query_chars", type=int, default=d["max_query_chars"].default)
    p.add_argument("--max_batch_queries", type=int, default=d["max_batch_queries"].default)
    p.add_argument("--max_wait_ms", type=float, default=d["max_wait_ms"].default)
    p.add_argument("--no_coalesce", action="store_true", help="run each request alone (benchmark baseline)")
    p.add_argument("--no_guard_pipeline", action="store_true",
                   help="guarded mode: run the fp32 fallback on the same thread as the bf16 pass")
    p.add_argument("--guard_workers", type=int, default=d["guard_workers"].default,
                   help="guarded mode: threads running the bf16 pass (the fp32 fallback has its own)")
    p.add_argument("--request_timeout_s", type=float, default=d["request_timeout_s"].default)
    p.add_argument("--no_fast_lane", action="store_true", help="serve /retrieve through FastAPI only (slower)")
    p.add_argument("--no_warm_up", action="store_true", help="guarded mode: skip the bf16 shape warm-up at start-up")
    p.add_argument("--torch_threads", type=int, default=0 if os.environ.get("OMP_NUM_THREADS") else 1,
                   help="intra-op threads for query encoding; 0 = torch default (OMP_NUM_THREADS); default 1 unless "
                        "OMP_NUM_THREADS is set")
    p.add_argument("--gil_switch_interval_ms", type=float, default=d["gil_switch_interval_ms"].default)
    p.add_argument("--token_env", default=TOKEN_ENV, help="env var holding an optional bearer token")
    p.add_argument("--serper_api_key", help=f"Serper key (default: $SERPER_API_KEY)")
    p.add_argument("--serper_url", default=d["serper_url"].default)
    p.add_argument("--check_only", action="store_true", help="verify the index and encoder, then exit")
    p.add_argument("--log_level", default="info")
    a = p.parse_args(argv)
    cfg = ServerConfig(index_dir=a.index_dir, online=a.online, host=a.host, port=a.port, method=a.method,
                       encoder=a.encoder, encoder_mode=a.encoder_mode, guard_eps=a.guard_eps,
                       guard_order=a.guard_order, device=a.device, faiss_gpu=a.faiss_gpu,
                       gpu_storage=a.gpu_storage, corpus=a.corpus, fast_lane=not a.no_fast_lane,
                       warm_up=not a.no_warm_up,
                       redis_url=a.redis_url, cache_ttl_s=a.cache_ttl_s, lru_size=a.lru_size,
                       cache_normalization=a.cache_normalization, default_topk=a.default_topk, max_topk=a.max_topk,
                       max_queries=a.max_queries, max_query_chars=a.max_query_chars,
                       max_batch_queries=a.max_batch_queries, max_wait_ms=a.max_wait_ms, coalesce=not a.no_coalesce,
                       guard_pipeline=not a.no_guard_pipeline, guard_workers=a.guard_workers,
                       request_timeout_s=a.request_timeout_s, gil_switch_interval_ms=a.gil_switch_interval_ms,
                       torch_threads=a.torch_threads,
                       token=os.environ.get(a.token_env) or None, serper_api_key=a.serper_api_key,
                       serper_url=a.serper_url)
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        backend = open_backend(cfg)
    except (IndexLoadError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"[server] refusing to start: {exc}", file=sys.stderr)
        return 2
    if args.check_only:
        print(f"[server] index ok: {json.dumps(backend.health())}")
        return 0
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.token is None:
        logger.warning("binding %s without a bearer token: anyone who can reach this port can query", cfg.host)
    # The owner thread releases the GIL inside every torch/faiss op and must win it back for the next op. With
    # Python's default 5 ms switch interval a busy event loop makes each reacquisition wait up to 5 ms (a GIL
    # convoy: ~1 s per MiniLM batch under load); a short interval lets the owner thread back in promptly.
    sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000.0)
    import uvicorn

    app = create_app(cfg, backend)
    uvicorn.run(FastLane(app, cfg) if cfg.fast_lane else app, host=cfg.host, port=cfg.port, log_level="warning",
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
