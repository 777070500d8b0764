"""Single-query retrieval for the async loop over one pooled HTTP client per rollout.

`RetrievalClient.aretrieve` opens a new `httpx.AsyncClient` per call. Building one costs ~55 ms of CPU (its SSL
context loads the CA bundle, even for plain http) and runs on the event loop, so one call per query would stall
every trajectory on the loop for that long per search. A session keeps one AsyncClient (keep-alive connections)
for the whole rollout and sends each query through the client's own request, retry and error handling
(`RetrievalClient._post_async` / `_with_retries_async`), so timeouts, retries and `RetrievalError` behave exactly as
with `aretrieve`.

    async with RetrievalSession(client, max_connections=256) as session:
        hits = await session.retrieve_one("who wrote Hamlet", topk=3)
"""
from __future__ import annotations

import httpx

from stepsearch.search.client import RetrievalClient

__all__ = ["RetrievalSession"]


class RetrievalSession:
    """One query per request (the server's batcher coalesces concurrent ones), over pooled connections."""

    def __init__(self, client: RetrievalClient, max_connections: int):
        if not isinstance(client, RetrievalClient):
            raise TypeError(f"[agent] RetrievalSession needs a RetrievalClient, got {type(client).__name__}")
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

    async def retrieve_one(self, query: str, topk: int) -> list[dict]:
        """The hits of one query (`{"document": row, "score": float}`); RetrievalError after the client's retries."""
        if self._http is None:
            raise RuntimeError("[agent] RetrievalSession.retrieve_one outside `async with RetrievalSession(...)`")
        queries = self.client._check([query], topk)
        [hits] = await self.client._with_retries_async(lambda: self.client._post_async(self._http, queries, topk))
        return hits
