"""The server's fast lane (a plain ASGI handler in front of FastAPI for well-formed /retrieve requests) answers
exactly what the FastAPI route answers, hands every bad request to FastAPI for the same error, and fills and reads
the real Redis cache. In-process (TestClient) over the real wiki-18 index."""
from __future__ import annotations

import time

import pytest
import redis
from fastapi.testclient import TestClient

from stepsearch.search.server import FastLane, ServerConfig, create_app, open_backend, parse_fast

pytestmark = pytest.mark.timeout(300)

QUERIES = ["Evan Morris lobbyist", "1972 Caribbean Series", "writ of trespass", "Evan Morris lobbyist"]


def make_client(cfg: ServerConfig, fast: bool) -> TestClient:
    app = create_app(cfg, open_backend(cfg))
    return TestClient(FastLane(app) if fast else app)


@pytest.fixture(scope="module")
def clients(wiki_index_dir):
    """(fast lane, FastAPI only) over the same index; sorted fp32 so both compute the same numbers."""
    cfg = ServerConfig(index_dir=wiki_index_dir, encoder_mode="sorted", torch_threads=1)
    with make_client(cfg, True) as fast, make_client(cfg, False) as plain:
        yield fast, plain


@pytest.mark.parametrize("body", [
    {"queries": QUERIES, "topk": 3, "return_scores": True},
    {"queries": QUERIES, "topk": 2, "return_scores": False},
    {"queries": QUERIES[:2]},  # Search-R1 defaults: topk 3, no scores
    {"queries": ["Genentech"], "topk": 5, "return_scores": True, "topk_retrieval": 10},  # extra field ignored
], ids=["scores", "bare", "defaults", "extra-field"])
def test_fast_lane_answers_what_fastapi_answers(clients, body):
    fast, plain = clients
    for _ in range(2):  # the second round is served from the cache (pre-serialised on the fast lane)
        a, b = fast.post("/retrieve", json=body), plain.post("/retrieve", json=body)
        assert a.status_code == b.status_code == 200
        assert a.headers["content-type"] == "application/json"
        ra, rb = a.json()["result"], b.json()["result"]
        assert len(ra) == len(body["queries"])
        if body.get("return_scores"):
            assert [[h["document"] for h in q] for q in ra] == [[h["document"] for h in q] for q in rb]
            assert [h["score"] for q in ra for h in q] == pytest.approx([h["score"] for q in rb for h in q], abs=1e-5)
            assert all(set(h) == {"document", "score"} for q in ra for h in q)
        else:
            assert ra == rb
    assert fast.get("/stats").json()["cache"]["hits"] > 0


@pytest.mark.parametrize("raw", [
    b'{"queries": ["a"', b'["a"]', b'{"topk": 3}', b'{"queries": "who"}', b'{"queries": []}',
    b'{"queries": ["ok", ""]}', b'{"queries": ["ok", 5]}', b'{"queries": ["a"], "topk": 0}',
    b'{"queries": ["a"], "topk": true}', b'{"queries": ["a"], "return_scores": "yes"}',
    b'{"queries": ["a"], "topk": 101}', b'{"queries": ["' + b"x" * 4097 + b'"]}',
])
def test_bad_input_gets_fastapis_error(clients, raw):
    fast, plain = clients
    headers = {"content-type": "application/json"}
    a, b = fast.post("/retrieve", content=raw, headers=headers), plain.post("/retrieve", content=raw, headers=headers)
    assert a.status_code == b.status_code and a.status_code in (400, 422)
    assert a.json()["detail"] == b.json()["detail"]


@pytest.mark.parametrize("raw, want", [
    (b'{"queries": ["a", "b"], "topk": 2, "return_scores": true}', (["a", "b"], 2, True)),
    (b'{"queries": ["a"]}', (["a"], 3, False)),  # defaults: default_topk 3, no scores
    (b'{"queries": ["a"], "topk": null, "x": 1}', (["a"], 3, False)),
    (b'{"queries": ["a"], "topk": 2.0}', None),  # not a strict int
    (b'{"queries": ["a"], "return_scores": 1}', None),  # not a strict bool
    (b'{"queries": [" "]}', None),  # whitespace only
    (b'\xff', None),
])
def test_parse_fast_table(raw, want):
    assert parse_fast(raw, ServerConfig(index_dir="unused")) == want


def test_token_is_checked_on_the_fast_lane(wiki_index_dir):
    cfg = ServerConfig(index_dir=wiki_index_dir, encoder_mode="sorted", torch_threads=1, token="s3cret")
    with make_client(cfg, True) as client:
        body = {"queries": ["Evan Morris"], "topk": 1}
        assert client.post("/retrieve", json=body).status_code == 401
        assert client.post("/retrieve", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = client.post("/retrieve", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["result"][0][0]["title"] == "Evan Morris"


def test_fresh_results_reach_redis_and_serve_a_restarted_server(wiki_index_dir, redis_url):
    cfg = ServerConfig(index_dir=wiki_index_dir, encoder_mode="sorted", torch_threads=1,
                       redis_url=redis_url.rsplit("/", 1)[0] + "/5")
    r = redis.Redis.from_url(cfg.redis_url)
    r.flushdb()
    body = {"queries": ["fast lane redis probe", "another probe", "fast lane redis probe"], "topk": 2,
            "return_scores": True}
    with make_client(cfg, True) as first:
        want = first.post("/retrieve", json=body).json()
        deadline = time.monotonic() + 10
        while r.dbsize() < 2 and time.monotonic() < deadline:  # written in the background, one pipeline
            time.sleep(0.05)
    assert r.dbsize() == 2  # two distinct queries
    with make_client(cfg, True) as second:  # new process state: empty LRU, same Redis
        got = second.post("/retrieve", json=body).json()
        cache = second.get("/stats").json()["cache"]
    assert got == want
    assert cache["redis_hits"] == 3 and cache["misses"] == 0  # the repeat inside the request counts as a hit too
