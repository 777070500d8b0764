"""The retrieval server on the real stack: MiniLM index over the wiki-18 sample, uvicorn subprocess, real Redis."""
import random
import time

import httpx
import pytest

from stepsearch.search.corpus import iter_passages
from stepsearch.search.testing import start_redis, start_retrieval_server

WIKI = "data/samples/wiki18_sample_1000.jsonl"


def post(url, body, **kw):
    return httpx.post(url + "/retrieve", json=body, timeout=60, **kw)


def test_exact_schema_with_scores(retrieval_url):
    resp = post(retrieval_url, {"queries": ["lobbyist for Genentech", "medieval English law of trespass"],
                                "topk": 4, "return_scores": True, "topk_retrieval": 10})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert list(body) == ["result"] and len(body["result"]) == 2
    for hits in body["result"]:
        assert len(hits) == 4
        for hit in hits:
            assert set(hit) == {"document", "score"} and isinstance(hit["score"], float)
            doc = hit["document"]
            assert set(doc) == {"id", "contents", "title", "text"}  # wiki-18 rows: id + contents, plus the derived
            first, _, rest = doc["contents"].partition("\n")
            assert first.strip('"') == doc["title"] and rest == doc["text"]
            assert -1.0 <= hit["score"] <= 1.0  # cosine of unit vectors
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
    assert body["result"][0][0]["document"]["title"] == "Evan Morris"


def test_bare_rows_without_scores_match_scored_documents(retrieval_url):
    queries = ["Roche lobbyist", "writ of trespass"]
    scored = post(retrieval_url, {"queries": queries, "topk": 3, "return_scores": True}).json()["result"]
    bare = post(retrieval_url, {"queries": queries, "topk": 3, "return_scores": False}).json()["result"]
    default = post(retrieval_url, {"queries": queries}).json()["result"]  # Search-R1 defaults: no scores, topk 3
    assert bare == [[h["document"] for h in hits] for hits in scored]
    assert default == bare


def test_title_as_query_ranks_that_title_first(retrieval_url):
    titles = sorted({p.title for p in iter_passages(WIKI)})  # titles repeat across wiki-18 chunks
    result = post(retrieval_url, {"queries": titles, "topk": 1, "return_scores": True}).json()["result"]
    top_titles = [hits[0]["document"]["title"] for hits in result]
    accuracy = sum(t == top for t, top in zip(titles, top_titles)) / len(titles)
    print(f"title-as-query rank-1 accuracy: {accuracy:.3f} over {len(titles)} distinct titles")
    assert len(titles) == 472 and accuracy >= 0.9  # 472 distinct titles among the 1000 passages


def test_repeated_query_is_a_cache_hit(retrieval_url):
    query = f"cache probe {random.Random(1234).randrange(10**9)} Genentech"
    before = httpx.get(retrieval_url + "/stats").json()["cache"]
    first = post(retrieval_url, {"queries": [query], "topk": 2, "return_scores": True}).json()
    second = post(retrieval_url, {"queries": ["  " + query + " "], "topk": 2, "return_scores": True}).json()
    after = httpx.get(retrieval_url + "/stats").json()["cache"]
    assert first == second
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 1


def test_health_and_stats(retrieval_url):
    health = httpx.get(retrieval_url + "/health").json()
    assert health["status"] == "ok" and health["cache"]["redis"] == "up"
    assert health["num_passages"] == 1000 and health["method"] == "dense"
    stats = httpx.get(retrieval_url + "/stats").json()
    assert stats["requests"] >= 1 and stats["queries"] >= stats["requests"]
    assert {"p50", "p90", "p99"} <= set(stats["latency_ms"]) and stats["batch_sizes"]["batches"] >= 1


BAD_INPUTS = [
    ("malformed JSON", b'{"queries": ["a"', 400, "malformed JSON"),
    ("body not an object", b'["a"]', 422, "body"),
    ("missing queries", {"topk": 3}, 422, "queries: Field required"),
    ("queries not a list", {"queries": "who"}, 422, "queries"),
    ("empty queries", {"queries": []}, 422, "queries is empty"),
    ("empty string", {"queries": ["ok", ""]}, 422, "queries[1] is empty"),
    ("whitespace string", {"queries": ["   "]}, 422, "queries[0] is empty"),
    ("non-string item", {"queries": ["ok", 5]}, 422, "queries[1]"),
    ("null item", {"queries": [None]}, 422, "queries[0]"),
    ("topk zero", {"queries": ["a"], "topk": 0}, 422, "topk must be in [1, 100]"),
    ("topk negative", {"queries": ["a"], "topk": -2}, 422, "topk must be in [1, 100]"),
    ("topk above cap", {"queries": ["a"], "topk": 101}, 422, "topk must be in [1, 100]"),
    ("topk not int", {"queries": ["a"], "topk": "3"}, 422, "topk"),
    ("return_scores not bool", {"queries": ["a"], "return_scores": "yes"}, 422, "return_scores"),
    ("too many queries", {"queries": ["a"] * 4097}, 422, "too many queries: 4097 > max 4096"),
    ("over-long query", {"queries": ["x" * 4097]}, 422, "queries[0] has 4097 characters"),
]


@pytest.mark.parametrize("name, body, status, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_4xx_with_message_and_server_stays_up(retrieval_url, name, body, status, message):
    if isinstance(body, bytes):
        resp = httpx.post(retrieval_url + "/retrieve", content=body, headers={"content-type": "application/json"})
    else:
        resp = httpx.post(retrieval_url + "/retrieve", json=body)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["detail"]
    assert post(retrieval_url, {"queries": ["still up?"], "topk": 1}).status_code == 200


@pytest.mark.slow
def test_redis_killed_mid_test_and_bearer_token(wiki_index_dir):
    redis_proc = start_redis()
    server = start_retrieval_server(wiki_index_dir, redis_proc.url, env={"STEPSEARCH_RETRIEVAL_TOKEN": "s3cret"})
    auth = {"Authorization": "Bearer s3cret"}
    try:
        assert post(server.url, {"queries": ["a"]}).status_code == 401
        assert post(server.url, {"queries": ["a"]}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200  # health stays open for probes
        assert post(server.url, {"queries": ["Evan Morris"], "topk": 1}, headers=auth).status_code == 200
        redis_proc.kill()
        resp = post(server.url, {"queries": ["Genentech lobbying after redis died"], "topk": 2,
                                 "return_scores": True}, headers=auth)
        assert resp.status_code == 200 and len(resp.json()["result"][0]) == 2
        health = httpx.get(server.url + "/health").json()
        assert health["status"] == "degraded" and health["cache"]["redis"] == "down"
        assert "serving uncached" in health["problems"][0]
        redis_proc = start_redis(port=redis_proc.port)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").json()["cache"]["redis"] != "up":
            assert time.monotonic() < deadline, "server did not reconnect to Redis"
            time.sleep(0.3)
        assert post(server.url, {"queries": ["back with redis"], "topk": 1}, headers=auth).status_code == 200
    finally:
        server.stop()
        redis_proc.stop()
