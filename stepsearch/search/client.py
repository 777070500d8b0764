"""Client for the rollout: batched httpx calls to `/retrieve` with timeouts and retries with backoff.

    client = RetrievalClient("http://127.0.0.1:8000")
    hits = client.retrieve(["who wrote Hamlet"], topk=3)          # sync
    hits = await client.aretrieve(queries, topk=3)                 # async; batches sent concurrently
    async with client.session(max_connections=256) as session:    # one pooled AsyncClient for many calls
        hits_one = await session.retrieve_one("who wrote Hamlet", topk=3)
    hits[i] == [{"document": {"id", "title", "text", "contents", ...}, "score": float}, ...]

Connection errors, timeouts and HTTP 5xx are retried (exponential backoff from `backoff_s`, `max_retries` retries
after the first try); a 4xx is the caller's fault and raises at once. Either way the caller gets a
`RetrievalError` naming the URL and the cause.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
from tenacity import (AsyncRetrying, RetryError, Retrying, retry_if_exception, stop_after_attempt,
                      wait_exponential)


TOKEN_ENV = "STEPSEARCH_RETRIEVAL_TOKEN"
"""The environment variable holding the server's optional bearer token (server `--token_env` default)."""
DEFAULT_MAX_QUERY_CHARS = 4096
"""The server's default cap on one query's length (`--max_query_chars`); a longer query gets a 422."""


class RetrievalError(RuntimeError):
    """The retrieval server could not answer (after retries for transient failures)."""


class _Retryable(Exception):
    """A transient failure (connection, timeout, 5xx): try again."""


@dataclass(frozen=True)
class _Limits:
    # queries per HTTP request (the server's default cap is 4096; smaller requests let the server coalesce)
    batch_size: int = 256
    # requests in flight per aretrieve call
    max_concurrency: int = 8


class RetrievalClient:
    def __init__(self, url: str, timeout_s: float = 30.0, max_retries: int = 3, backoff_s: float = 0.5,
                 token: str | None = None, batch_size: int = 256, max_concurrency: int = 8):
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"[client] need max_retries >= 0, timeout_s > 0, backoff_s >= 0; got "
                             f"{max_retries}, {timeout_s}, {backoff_s}")
        if batch_size <= 0 or max_concurrency <= 0:
            raise ValueError(f"[client] batch_size and max_concurrency must be positive, got "
                             f"{batch_size}, {max_concurrency}")
        base = url.rstrip("/")
        self.url = base if base.endswith("/retrieve") else base + "/retrieve"
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.limits = _Limits(batch_size, max_concurrency)

    # ---- public API (docs/CONTRACTS.md)
    def retrieve(self, queries: list[str], topk: int = 3) -> list[list[dict]]:
        """Per query, its hits `{"document": row, "score": float}` (blocking)."""
        queries = self._check(queries, topk)
        with httpx.Client(timeout=self.timeout_s, headers=self.headers) as http:
            out: list[list[dict]] = []
            for chunk in self._chunks(queries):
                out.extend(self._with_retries(Retrying, lambda c=chunk: self._post_sync(http, c, topk)))
        return out

    async def aretrieve(self, queries: list[str], topk: int = 3) -> list[list[dict]]:
        """Async `retrieve`: chunks of `batch_size` queries, up to `max_concurrency` requests in flight (over a
        session of its own; for many calls, open one `session` and call its `retrieve`)."""
        queries = self._check(queries, topk)
        async with self.session(max_connections=self.limits.max_concurrency) as session:
            return await session.retrieve(queries, topk)

    def session(self, max_connections: int | None = None) -> "RetrievalSession":
        """An async context manager holding one pooled `httpx.AsyncClient` (keep-alive connections) for many
        calls; its `retrieve` / `retrieve_one` behave as `aretrieve` (same timeout, retries, RetrievalError).
        max_connections: connections in the pool (None: `max_concurrency`)."""
        return RetrievalSession(self, max_connections or self.limits.max_concurrency)

    # ---- internals
    @staticmethod
    def _check(queries, topk) -> list[str]:
        if isinstance(queries, str):
            raise TypeError("[client] queries must be a list of strings, got one string; wrap it in a list")
        if not isinstance(topk, int) or topk <= 0:
            raise ValueError(f"[client] topk must be a positive int, got {topk!r}")
        return list(queries)

    def _chunks(self, queries: list[str]) -> list[list[str]]:
        n = self.limits.batch_size
        return [queries[i:i + n] for i in range(0, len(queries), n)]

    def _payload(self, chunk: list[str], topk: int) -> dict:
        return {"queries": chunk, "topk": topk, "return_scores": True}

    def _post_sync(self, http: httpx.Client, chunk: list[str], topk: int) -> list[list[dict]]:
        try:
            resp = http.post(self.url, json=self._payload(chunk, topk))
        except httpx.TransportError as exc:  # connect/read errors and timeouts
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        return self._parse(resp, len(chunk))

    async def _post_async(self, http: httpx.AsyncClient, chunk: list[str], topk: int) -> list[list[dict]]:
        try:
            resp = await http.post(self.url, json=self._payload(chunk, topk))
        except httpx.TransportError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        return self._parse(resp, len(chunk))

    def _parse(self, resp: httpx.Response, n: int) -> list[list[dict]]:
        if resp.status_code >= 500:
            raise _Retryable(f"HTTP {resp.status_code}: {resp.text[:300]}")
        if resp.status_code != 200:
            raise RetrievalError(f"retrieval request to {self.url} rejected with HTTP {resp.status_code}: "
                                 f"{resp.text[:300]}")
        try:
            result = resp.json()["result"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RetrievalError(f"{self.url} answered without a 'result' list: {resp.text[:300]!r}") from exc
        if not isinstance(result, list) or len(result) != n:
            raise RetrievalError(f"{self.url} returned {len(result) if isinstance(result, list) else result!r} "
                                 f"result lists for {n} queries")
        return result

    def _retry_kwargs(self) -> dict:
        return dict(stop=stop_after_attempt(self.max_retries + 1),
                    wait=wait_exponential(multiplier=self.backoff_s, max=30.0),
                    retry=retry_if_exception(lambda e: isinstance(e, _Retryable)), reraise=False)

    def _with_retries(self, retrying_cls, fn):
        try:
            for attempt in retrying_cls(**self._retry_kwargs()):
                with attempt:
                    return fn()
        except RetryError as exc:
            raise self._give_up(exc) from exc.last_attempt.exception()

    async def _with_retries_async(self, fn):
        try:
            async for attempt in AsyncRetrying(**self._retry_kwargs()):
                with attempt:
                    return await fn()
        except RetryError as exc:
            raise self._give_up(exc) from exc.last_attempt.exception()

    def _give_up(self, exc: RetryError) -> RetrievalError:
        cause = exc.last_attempt.exception()
        return RetrievalError(f"retrieval server {self.url} failed after {self.max_retries + 1} tries: {cause}")


class RetrievalSession:
    """`RetrievalClient.session()`: one `httpx.AsyncClient` for the session's lifetime.

    Building an AsyncClient costs ~55 ms of CPU (its SSL context loads the CA bundle, even for plain http) on the
    event loop, so a caller sending one query per request (the async agent loop) keeps one session per rollout.
    Every request goes through the client's own request, retry and error handling.
    """

    def __init__(self, client: RetrievalClient, max_connections: int):
        if max_connections < 1:
            raise ValueError(f"[client] max_connections must be >= 1, got {max_connections}")
        self.client = client
        self.max_connections = max_connections
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> "RetrievalSession":
        self._http = httpx.AsyncClient(timeout=self.client.timeout_s, headers=self.client.headers,
                                       limits=httpx.Limits(max_connections=self.max_connections,
                                                           max_keepalive_connections=self.max_connections))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()
        self._http = None

    def _open_http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("[client] a RetrievalSession is used outside `async with client.session(...)`")
        return self._http

    async def retrieve(self, queries: list[str], topk: int = 3) -> list[list[dict]]:
        """Per query, its hits: chunks of `batch_size` queries, up to `max_concurrency` requests in flight."""
        queries = self.client._check(queries, topk)
        http = self._open_http()
        sem = asyncio.Semaphore(self.client.limits.max_concurrency)

        async def one(chunk: list[str]) -> list[list[dict]]:
            async with sem:
                return await self.client._with_retries_async(lambda: self.client._post_async(http, chunk, topk))

        parts = await asyncio.gather(*(one(c) for c in self.client._chunks(queries)))
        return [hits for part in parts for hits in part]

    async def retrieve_one(self, query: str, topk: int = 3) -> list[dict]:
        """The hits of one query, in a request of its own (a server batcher coalesces concurrent ones)."""
        if not isinstance(query, str):
            raise TypeError(f"[client] retrieve_one takes one query string, got {type(query).__name__}")
        [hits] = await self.retrieve([query], topk)
        return hits
