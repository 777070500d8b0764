"""Online search backend (Serper, google.serper.dev) behind the same `/retrieve` contract as the local index.

Serper's documented request: `POST {url}` with header `X-API-KEY: <key>` and JSON `{"q": query, "num": k}`.
Its response holds `organic: [{"title", "link", "snippet", "position", ...}, ...]` (plus optional `answerBox`,
`knowledgeGraph`, ...). Each organic result becomes a corpus-like row:
`{"id": link, "title": title, "text": snippet, "contents": '"title"\\nsnippet', "link", "position",
"source": "serper"}`.
Serper gives no relevance score, so `score = 1 / rank` (1.0 for the top result), which keeps the rank order.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass

import httpx

from stepsearch.search.corpus import format_contents

SERPER_URL = "https://google.serper.dev/search"
SERPER_KEY_ENV = "SERPER_API_KEY"


class UpstreamError(RuntimeError):
    """The online search API failed (bad key, quota, 5xx, timeout, malformed JSON); the message says which."""


@dataclass(frozen=True)
class SerperConfig:
    api_key: str
    url: str = SERPER_URL
    timeout_s: float = 10.0
    # parallel upstream calls per request batch
    max_concurrency: int = 16
    gl: str | None = None  # country, e.g. "us"
    hl: str | None = None  # language, e.g. "en"

    def __post_init__(self):
        if not self.api_key:
            raise ValueError(f"[online] Serper needs an API key: pass --serper_api_key KEY or set ${SERPER_KEY_ENV}")

    @classmethod
    def from_args(cls, api_key: str | None, **kw) -> "SerperConfig":
        return cls(api_key=api_key or os.environ.get(SERPER_KEY_ENV, ""), **kw)


def serper_row(item: dict, rank: int) -> dict:
    """One organic result -> a corpus-like document row (rank from 1)."""
    title = str(item.get("title", ""))
    text = str(item.get("snippet", ""))
    return {**item, "id": str(item.get("link") or f"serper-{rank}"), "title": title, "text": text,
            "contents": format_contents(title, text), "position": item.get("position", rank), "source": "serper"}


class SerperBackend:
    """`await search(queries, topk) -> list[list[{"document": row, "score": float}]]` via the Serper API."""

    def __init__(self, cfg: SerperConfig):
        self.cfg = cfg
        self.identity = "serper-" + hashlib.sha256(f"{cfg.url}|{cfg.gl}|{cfg.hl}".encode()).hexdigest()[:12]
        self._client = httpx.AsyncClient(timeout=cfg.timeout_s, headers={"X-API-KEY": cfg.api_key,
                                                                        "Content-Type": "application/json"})
        self._sem = asyncio.Semaphore(cfg.max_concurrency)

    async def search(self, queries: list[str], topk: int) -> list[list[dict]]:
        return list(await asyncio.gather(*(self._one(q, topk) for q in queries)))

    async def _one(self, query: str, topk: int) -> list[dict]:
        payload = {"q": query, "num": topk}
        if self.cfg.gl:
            payload["gl"] = self.cfg.gl
        if self.cfg.hl:
            payload["hl"] = self.cfg.hl
        async with self._sem:
            try:
                resp = await self._client.post(self.cfg.url, json=payload)
            except httpx.HTTPError as exc:
                raise UpstreamError(f"Serper request to {self.cfg.url} failed: {type(exc).__name__}: {exc}") from exc
        if resp.status_code in (401, 403):
            raise UpstreamError(f"Serper rejected the API key (HTTP {resp.status_code}): {resp.text[:200]}; "
                                f"check --serper_api_key / ${SERPER_KEY_ENV}")
        if resp.status_code != 200:
            raise UpstreamError(f"Serper returned HTTP {resp.status_code}: {resp.text[:200]}")
        try:
            organic = resp.json().get("organic", [])
        except (ValueError, AttributeError) as exc:
            raise UpstreamError(f"Serper returned malformed JSON: {resp.text[:200]!r}") from exc
        if not isinstance(organic, list):
            raise UpstreamError(f"Serper's 'organic' field is a {type(organic).__name__}, expected a list")
        items = [item for item in organic if isinstance(item, dict)][:topk]
        return [{"document": serper_row(item, rank), "score": 1.0 / rank} for rank, item in enumerate(items, start=1)]

    def health(self) -> dict:
        return {"backend": "serper", "url": self.cfg.url}

    async def aclose(self) -> None:
        await self._client.aclose()
