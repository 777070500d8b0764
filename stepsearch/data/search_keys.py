"""Search-key generation as in the paper's data pipeline (docs/method.md §4.1 (b)-(c)).

For every sub-question:
  1. an LLM behind any OpenAI-compatible chat endpoint (e.g. `vllm serve`) rewrites it into N search queries;
  2. each query goes to M retrieval sources (in-process BM25, a dense FAISS index, any `/retrieve` server);
  3. the query is kept iff at least ceil(M/2) sources return a valid hit among their top-k, where a hit is
     valid when it contains the sub-answer (normalized, on word boundaries) or is one of the support docs.

The paper does not give N, M or "valid"; these are our choices (defaults N=3, ceil(M/2), top-k 3).
A group whose queries all fail keeps the decomposition key (the offline default), and is counted.

Mechanics: LLM calls run concurrently under a semaphore with retries; every LLM answer is cached in a
JSONL file keyed by (model, prompt, sampling), and every finished row is appended to a progress JSONL, so
an interrupted run resumes where it stopped without repeating calls. The final parquet is written atomically.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential
from tqdm import tqdm

from stepsearch.data.check import normalize
from stepsearch.data.formats import QAExample, SupportDoc, dedup_keep_order, support_doc_fields
from stepsearch.search.corpus import split_contents

REWRITE_SYSTEM = "You write short, specific web search queries."
REWRITE_USER = (
    "Rewrite the sub-question below into {n} different search-engine queries that would find the passage "
    "answering it. Keep every named entity. Write exactly {n} lines, one query per line, with no numbering "
    "and no other text.\nSub-question: {question}"
)


# ---- retrieval sources --------------------------------------------------------------------------------------
Hit = tuple[str, str]  # (title, text)


class RetrievalSource(Protocol):
    name: str

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        """Per query, up to topk (title, text) hits, best first."""


class BM25Source:
    """In-process BM25 (bm25s) over (title, text) passages; zero-score hits are dropped."""

    def __init__(self, passages: Sequence[Hit], name: str = "bm25"):
        import bm25s

        self.name, self.passages = name, list(passages)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize([f"{t}\n{x}" for t, x in self.passages], show_progress=False),
                             show_progress=False)

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        import bm25s

        k = min(topk, len(self.passages))
        docs, scores = self.retriever.retrieve(bm25s.tokenize(queries, show_progress=False), k=k, show_progress=False)
        return [[self.passages[int(d)] for d, s in zip(row_d, row_s) if s > 0] for row_d, row_s in zip(docs, scores)]


class DenseSource:
    """In-process dense retrieval: `stepsearch.search.encoders.Encoder` embeddings in a FAISS inner-product index."""

    def __init__(self, passages: Sequence[Hit], encoder=None, name: str = "dense"):
        import faiss

        from stepsearch.search.encoders import Encoder

        self.name, self.passages = name, list(passages)
        self.encoder = encoder or Encoder("minilm")
        emb = self.encoder.encode_passages([f'"{t}"\n{x}' for t, x in self.passages])  # (N, D) float32
        self.index = faiss.IndexFlatIP(emb.shape[1])
        self.index.add(emb)

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        _, ids = self.index.search(self.encoder.encode_queries(queries), min(topk, len(self.passages)))  # (Q, k)
        return [[self.passages[int(i)] for i in row if i >= 0] for row in ids]


class HTTPSource:
    """Any server speaking the `/retrieve` contract (docs/CONTRACTS.md "Retrieval"), e.g. an online-search proxy."""

    def __init__(self, url: str, name: str | None = None, timeout_s: float = 30.0):
        self.url, self.name, self.timeout_s = url, name or url, timeout_s

    def search(self, queries: list[str], topk: int) -> list[list[Hit]]:
        r = httpx.post(self.url, json={"queries": queries, "topk": topk, "return_scores": True}, timeout=self.timeout_s)
        r.raise_for_status()
        return [[_doc_hit(h["document"] if isinstance(h, dict) and "document" in h else h) for h in hits]
                for hits in r.json()["result"]]


def _doc_hit(doc: dict) -> Hit:
    if isinstance(doc.get("text"), str):
        return doc.get("title") or "", doc["text"]
    if isinstance(doc.get("contents"), str):
        return split_contents(doc["contents"])
    return doc.get("title") or "", str(doc.get("content", ""))


# ---- validity and voting ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubQuestion:
    """One decomposition step of one row: the (resolved) sub-question and what a valid hit must contain."""

    row: int
    step: int
    question: str
    answer: str | None
    support_docs: tuple[SupportDoc, ...]


def is_valid_hit(hit: Hit, sub: SubQuestion) -> bool:
    """A hit is valid if it contains the normalized sub-answer as whole words, or is one of the support docs."""
    title, text = hit
    norm_text = normalize(text)
    if any(text == d.text or norm_text == normalize(d.text) for d in sub.support_docs):
        return True
    answer = normalize(sub.answer or "")
    return bool(answer) and f" {answer} " in f" {normalize(title + ' ' + text)} "


def default_min_votes(num_sources: int) -> int:
    """The paper's rule: a query must succeed in at least ceil(M/2) of M sources."""
    return math.ceil(num_sources / 2)


def vote(queries: list[str], subs: list[SubQuestion], sources: Sequence[RetrievalSource], topk: int) -> list[int]:
    """Per (query, sub-question) pair, the number of sources with a valid hit in their top-k."""
    votes = [0] * len(queries)
    for source in sources:
        for i, hits in enumerate(source.search(queries, topk)):
            votes[i] += any(is_valid_hit(h, subs[i]) for h in hits)
    return votes


# ---- LLM rewriting ------------------------------------------------------------------------------------------
_BULLET = re.compile(r"^\s*(?:[-*•]|\(?\d+[.):]|Q\d+[.):]?)\s*")


def parse_queries(text: str, n: int) -> list[str]:
    """The first n distinct non-empty lines, without bullets/numbering/quotes."""
    out, seen = [], set()
    for line in text.splitlines():
        q = _BULLET.sub("", line).strip().strip('"\'').strip()
        if q and q.lower() not in seen:
            seen.add(q.lower())
            out.append(q)
    return out[:n]


@dataclass(frozen=True)
class KeyGenConfig:
    """Options of gen_search_keys.py."""

    base_url: str                       # OpenAI-compatible API root, e.g. http://127.0.0.1:8001/v1
    model: str
    n_queries: int = 3                  # N rewrites per sub-question
    topk: int = 3                       # hits inspected per source
    min_votes: int | None = None        # default ceil(M/2)
    concurrency: int = 4                # simultaneous chat requests
    temperature: float = 0.7
    max_tokens: int = 128
    seed: int = 0
    timeout_s: float = 60.0
    max_retries: int = 3
    api_key: str | None = None
    keep_decomposition_key: bool = False  # also keep the decomposition key in each group
    chunk_rows: int = 16                # rows per LLM/retrieval round (and per progress flush)

    def __post_init__(self):
        if self.n_queries < 1 or self.concurrency < 1 or self.topk < 1:
            raise ValueError(f"[gen_search_keys] n_queries, concurrency and topk must be >= 1, got {self}")


class ChatClient:
    """Async OpenAI-compatible /chat/completions client with a concurrency limit, retries and a JSONL cache."""

    def __init__(self, cfg: KeyGenConfig, cache_path: str | None):
        self.cfg, self.cache_path = cfg, cache_path
        self.cache: dict[str, list[str]] = {}
        self.requests = 0
        if cache_path and os.path.exists(cache_path):
            self.cache = {r["key"]: r["queries"] for r in _read_jsonl_tolerant(cache_path)}

    def _payload(self, question: str) -> dict:
        c = self.cfg
        return {"model": c.model, "temperature": c.temperature, "max_tokens": c.max_tokens, "seed": c.seed,
                "messages": [{"role": "system", "content": REWRITE_SYSTEM},
                             {"role": "user", "content": REWRITE_USER.format(n=c.n_queries, question=question)}]}

    async def rewrite(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, question: str) -> list[str]:
        payload = self._payload(question)
        key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        if key in self.cache:
            return self.cache[key]
        async with sem:
            content = await self._post(client, payload)
        queries = parse_queries(content, self.cfg.n_queries)
        self.cache[key] = queries
        if self.cache_path:
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "question": question, "queries": queries}) + "\n")
        return queries

    async def _post(self, client: httpx.AsyncClient, payload: dict) -> str:
        url = self.cfg.base_url.rstrip("/") + "/chat/completions"
        headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
        async for attempt in AsyncRetrying(stop=stop_after_attempt(self.cfg.max_retries), reraise=True,
                                           wait=wait_exponential(multiplier=0.2, max=5),
                                           retry=retry_if_exception(_retryable)):
            with attempt:
                self.requests += 1
                r = await client.post(url, json=payload, headers=headers, timeout=self.cfg.timeout_s)
                r.raise_for_status()
                try:
                    return r.json()["choices"][0]["message"]["content"] or ""
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    raise ValueError(f"{url} answered without choices[0].message.content: {r.text[:200]!r}") from e
        raise AssertionError("unreachable")


def _retryable(e: BaseException) -> bool:
    if isinstance(e, httpx.HTTPStatusError):
        return e.response.status_code >= 500 or e.response.status_code == 429
    return isinstance(e, httpx.TransportError)


def _read_jsonl_tolerant(path: str) -> list[dict]:
    """Lines of an append-only log; a torn last line (killed mid-write) is ignored."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _end_with_newline(path: str) -> None:
    """After a torn last line, start the next record on a fresh line."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


# ---- the row loop -------------------------------------------------------------------------------------------
def subquestions(ex: QAExample, row: int) -> list[SubQuestion]:
    """One SubQuestion per key group; the first key of a group is taken as the sub-question."""
    answers = [hop[0] if hop else None for hop in ex.sub_answers] + [None] * len(ex.search_keys)
    return [SubQuestion(row, s, g[0], answers[s], ex.support_docs) for s, g in enumerate(ex.search_keys) if g]


@dataclass
class KeyGenStats:
    rows: int = 0
    resumed_rows: int = 0
    sub_questions: int = 0
    queries_proposed: int = 0
    queries_kept: int = 0
    fallback_groups: int = 0  # groups with no valid query: the decomposition key was kept
    llm_requests: int = 0


def select_keys(proposals: list[str], votes: list[int], min_votes: int, original: tuple[str, ...],
                keep_original: bool) -> tuple[tuple[str, ...], int]:
    """The kept group for one sub-question and the number of proposals kept; with none kept the group
    falls back to the decomposition key `original`."""
    kept = [q for q, v in zip(proposals, votes) if v >= min_votes]
    if not kept:
        return original, 0
    return dedup_keep_order((list(original) if keep_original else []) + kept), len(kept)


async def _generate_chunk(chat: ChatClient, subs: list[SubQuestion]) -> list[list[str]]:
    """Rewrites for each sub-question; a sub-question repeated within the chunk is asked once."""
    unique = list(dict.fromkeys(s.question for s in subs))
    sem = asyncio.Semaphore(chat.cfg.concurrency)
    limits = httpx.Limits(max_connections=chat.cfg.concurrency)
    async with httpx.AsyncClient(limits=limits) as client:
        answers = await asyncio.gather(*(chat.rewrite(client, sem, q) for q in unique))
    by_question = dict(zip(unique, answers))
    return [by_question[s.question] for s in subs]


def generate_keys(examples: list[QAExample], sources: Sequence[RetrievalSource], cfg: KeyGenConfig,
                  progress_path: str, cache_path: str | None = None) -> tuple[list[QAExample], KeyGenStats]:
    """Rewrite, filter and write the keys into the examples (same order). Resumes from progress_path."""
    if not sources:
        raise ValueError("[gen_search_keys] need at least one retrieval source")
    min_votes = cfg.min_votes or default_min_votes(len(sources))
    if not 1 <= min_votes <= len(sources):
        raise ValueError(f"[gen_search_keys] min_votes ({min_votes}) must be in 1..{len(sources)} (the number of sources)")
    done = {r["id"]: r for r in _read_jsonl_tolerant(progress_path)} if os.path.exists(progress_path) else {}
    _end_with_newline(progress_path)
    chat, stats = ChatClient(cfg, cache_path), KeyGenStats(rows=len(examples))
    todo = [i for i, ex in enumerate(examples) if ex.id not in done]
    stats.resumed_rows = len(examples) - len(todo)
    with tqdm(total=len(examples), initial=stats.resumed_rows, desc="search keys", unit="row") as bar:
        for start in range(0, len(todo), cfg.chunk_rows):
            chunk = todo[start:start + cfg.chunk_rows]
            for rec in _process_chunk([examples[i] for i in chunk], chunk, chat, sources, cfg, min_votes, stats):
                done[rec["id"]] = rec
                with open(progress_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.update(len(chunk))
    stats.llm_requests = chat.requests
    out = [replace(ex, search_keys=tuple(tuple(g) for g in done[ex.id]["search_keys"])) for ex in examples]
    return out, stats


def _process_chunk(exs, rows, chat, sources, cfg, min_votes, stats) -> list[dict]:
    """LLM rewrites for every sub-question of a chunk of rows, one batched vote per source, kept groups."""
    subs = [s for ex, r in zip(exs, rows) for s in subquestions(ex, r)]
    proposals = asyncio.run(_generate_chunk(chat, subs))
    flat_q = [q for p in proposals for q in p]
    flat_s = [s for s, p in zip(subs, proposals) for _ in p]
    votes = vote(flat_q, flat_s, sources, cfg.topk) if flat_q else []
    by_row = dict(zip(rows, exs))
    groups: dict[tuple[int, int], tuple[str, ...]] = {}
    start = 0
    for sub, props in zip(subs, proposals):
        original = by_row[sub.row].search_keys[sub.step]
        group, n_kept = select_keys(props, votes[start:start + len(props)], min_votes, original,
                                    cfg.keep_decomposition_key)
        start += len(props)
        groups[(sub.row, sub.step)] = group
        stats.sub_questions += 1
        stats.queries_proposed += len(props)
        stats.queries_kept += n_kept
        stats.fallback_groups += n_kept == 0
    return [{"id": ex.id, "search_keys": [list(groups.get((r, s), g)) for s, g in enumerate(ex.search_keys)]}
            for ex, r in zip(exs, rows)]


def keys_summary(stats: KeyGenStats) -> dict:
    d = dict(stats.__dict__)
    d["keep_rate"] = stats.queries_kept / stats.queries_proposed if stats.queries_proposed else 0.0
    return d



def row_to_example(row: dict, where: str) -> QAExample:
    """A dataset row (seed format) as a QAExample; sub-answers are unknown, so validity uses the support docs."""
    gt, extra = row["reward_model"]["ground_truth"], row["extra_info"]
    docs = tuple(SupportDoc(*support_doc_fields(d)) for d in extra["support_docs"])  # {title,text|paragraph_text}|str
    return QAExample(id=str(row.get("id") or extra["index"]), question=row["prompt"][0]["content"],
                     answers=tuple(gt["target"]), search_keys=tuple(tuple(g) for g in gt["search_keys"]),
                     support_docs=docs, where=where)
