"""The async loop's retriever: one pooled HTTP session per rollout (`RetrievalClient.session`), one query per request.

A session keeps one `httpx.AsyncClient` (keep-alive connections) for the whole rollout instead of one per query
(building one costs ~55 ms of CPU on the event loop, stalling every trajectory), and sends each query through the
client's own request, retry and error handling, so timeouts, retries and `RetrievalError` are those of
`RetrievalClient.aretrieve`.

    async with open_retrieval_session(client, max_connections=256) as session:
        hits = await session.retrieve_one("who wrote Hamlet", topk=3)
"""
from __future__ import annotations

from stepsearch.search.client import RetrievalClient, RetrievalSession

__all__ = ["RetrievalSession", "open_retrieval_session"]


def open_retrieval_session(client: RetrievalClient, max_connections: int) -> RetrievalSession:
    """`client.session(max_connections)`, with a clear error for anything but a RetrievalClient."""
    if not isinstance(client, RetrievalClient):
        raise TypeError(f"[agent] the async rollout needs a RetrievalClient, got {type(client).__name__}")
    return client.session(max_connections=max_connections)
