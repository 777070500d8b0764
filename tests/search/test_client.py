"""RetrievalClient: sync/async agreement, chunking, retries with backoff on connection errors and 5xx."""
import asyncio
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from stepsearch.search.client import RetrievalClient, RetrievalError
from stepsearch.search.testing import free_port

QUERIES = ["Evan Morris lobbyist", "history of trespass", "Pittsburgh Pirates season", "Caribbean Series",
           "New Brunswick election", "NFC Championship Game", "Genentech", "Roche"]


def test_sync_async_and_chunked_agree(retrieval_url):
    whole = RetrievalClient(retrieval_url).retrieve(QUERIES, topk=2)
    chunked = RetrievalClient(retrieval_url, batch_size=3, max_concurrency=2)
    assert asyncio.run(chunked.aretrieve(QUERIES, topk=2)) == whole
    assert chunked.retrieve(QUERIES, topk=2) == whole
    assert len(whole) == len(QUERIES) and all(len(h) == 2 for h in whole)
    assert whole[0][0]["document"]["title"] == "Evan Morris" and isinstance(whole[0][0]["score"], float)


def test_4xx_raises_at_once_with_the_server_detail(retrieval_url):
    client = RetrievalClient(retrieval_url, max_retries=3, backoff_s=1.0)
    t0 = time.perf_counter()
    with pytest.raises(RetrievalError, match=r"HTTP 422.*topk must be in \[1, 100\]"):
        client.retrieve(["a"], topk=500)
    assert time.perf_counter() - t0 < 1.0  # no backoff: a client error is not retried


def test_connection_refused_retries_then_raises():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    client = RetrievalClient(url, max_retries=2, backoff_s=0.1, timeout_s=2)
    t0 = time.perf_counter()
    with pytest.raises(RetrievalError, match=r"failed after 3 tries: ConnectError") as err:
        client.retrieve(["q"], topk=1)
    # waits 0.1 * 2^0 + 0.1 * 2^1 = 0.3 s between the three tries
    assert time.perf_counter() - t0 >= 0.3
    assert url in str(err.value)
    with pytest.raises(RetrievalError, match="failed after 3 tries"):
        asyncio.run(client.aretrieve(["q"], topk=1))


@pytest.fixture()
def flaky_server():
    """/retrieve answers 503 `fail_first` times, then a valid one-hit result; /slow/retrieve sleeps 2 s."""
    app, state = FastAPI(), {"calls": 0, "fail_first": 2}

    @app.post("/retrieve")
    async def retrieve(body: dict):
        state["calls"] += 1
        if state["calls"] <= state["fail_first"]:
            return JSONResponse({"detail": "overloaded"}, status_code=503)
        hit = {"document": {"id": "1", "title": "T", "text": "x", "contents": '"T"\nx'}, "score": 1.0}
        return {"result": [[hit] for _ in body["queries"]]}

    @app.post("/slow/retrieve")
    async def slow(body: dict):
        await asyncio.sleep(2)
        return {"result": []}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(10)


def test_5xx_is_retried_until_success(flaky_server):
    url, state = flaky_server
    hits = RetrievalClient(url, max_retries=3, backoff_s=0.01).retrieve(["a", "b"], topk=1)
    assert state["calls"] == 3 and [h[0]["document"]["id"] for h in hits] == ["1", "1"]


def test_5xx_after_last_try_raises(flaky_server):
    url, state = flaky_server
    state["fail_first"] = 100
    with pytest.raises(RetrievalError, match="failed after 2 tries: HTTP 503"):
        asyncio.run(RetrievalClient(url, max_retries=1, backoff_s=0.01).aretrieve(["a"], topk=1))
    assert state["calls"] == 2


def test_timeout_is_retried_then_raises(flaky_server):
    url, _ = flaky_server
    with pytest.raises(RetrievalError, match="failed after 2 tries: ReadTimeout"):
        RetrievalClient(url + "/slow", max_retries=1, backoff_s=0.01, timeout_s=0.3).retrieve(["a"], topk=1)


def test_bad_arguments():
    with pytest.raises(TypeError, match="list of strings"):
        RetrievalClient("http://127.0.0.1:1").retrieve("one string", topk=1)
    with pytest.raises(ValueError, match="topk"):
        RetrievalClient("http://127.0.0.1:1").retrieve(["q"], topk=0)
