"""Online (Serper) backend behind /retrieve, against a local stand-in that speaks Serper's documented JSON."""
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from stepsearch.search.testing import free_port, start_retrieval_server

KEY = "test-serper-key"


def serper_standin() -> tuple[FastAPI, list]:
    """POST /search with X-API-KEY and {"q", "num"} -> {"searchParameters", "organic": [...]} as Serper documents."""
    app, calls = FastAPI(), []

    @app.post("/search")
    async def search(request: Request):
        if request.headers.get("x-api-key") != KEY:
            return JSONResponse({"message": "Unauthorized.", "statusCode": 403}, status_code=403)
        body = await request.json()
        calls.append(body)
        q, num = body["q"], body.get("num", 10)
        if q.startswith("FAIL"):
            return JSONResponse({"message": "internal error"}, status_code=500)
        organic = [{"title": f"{q} – page {i}", "link": f"https://example.org/{i}?q={q.replace(' ', '+')}",
                    "snippet": f"Snippet {i} about {q}.", "position": i, "date": "Jan 1, 2025"}
                   for i in range(1, num + 1)]
        return {"searchParameters": {"q": q, "type": "search", "engine": "google"}, "organic": organic,
                "relatedSearches": [{"query": q + " more"}], "credits": 1}

    return app, calls


@pytest.fixture(scope="module")
def standin():
    app, calls = serper_standin()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "stand-in Serper server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/search", calls
    server.should_exit = True
    thread.join(10)


def online_server(url, key):
    return start_retrieval_server(None, extra_args=["--online", "serper", "--serper_url", url],
                                  env={"SERPER_API_KEY": key}, timeout_s=60)


def test_serper_results_follow_the_retrieve_contract_and_are_cached(standin):
    url, calls = standin
    server = online_server(url, KEY)
    try:
        body = {"queries": ["capital of France", "tallest mountain"], "topk": 2, "return_scores": True}
        result = httpx.post(server.url + "/retrieve", json=body, timeout=30).json()["result"]
        assert len(result) == 2 and [len(h) for h in result] == [2, 2]
        top = result[0][0]
        assert top["score"] == 1.0 and result[0][1]["score"] == 0.5  # score = 1 / rank
        doc = top["document"]
        assert doc["id"] == "https://example.org/1?q=capital+of+France"
        assert doc["title"] == "capital of France – page 1" and doc["text"] == "Snippet 1 about capital of France."
        assert doc["contents"] == '"capital of France – page 1"\nSnippet 1 about capital of France.'
        assert doc["date"] == "Jan 1, 2025" and doc["source"] == "serper"
        assert {c["q"]: c["num"] for c in calls[-2:]} == {"capital of France": 2, "tallest mountain": 2}
        n_calls = len(calls)
        again = httpx.post(server.url + "/retrieve", json=body, timeout=30).json()["result"]
        assert again == result and len(calls) == n_calls  # served from the cache, no upstream call
        bare = httpx.post(server.url + "/retrieve", json={**body, "return_scores": False}).json()["result"]
        assert bare[1][0] == result[1][0]["document"]

        resp = httpx.post(server.url + "/retrieve", json={"queries": ["FAIL please"], "topk": 1}, timeout=30)
        assert resp.status_code == 502 and "Serper returned HTTP 500" in resp.json()["detail"]
        assert httpx.get(server.url + "/health").json()["backend"] == "serper"
    finally:
        server.stop()


def test_wrong_key_gives_a_clear_upstream_error(standin):
    url, _ = standin
    server = online_server(url, "wrong-key")
    try:
        resp = httpx.post(server.url + "/retrieve", json={"queries": ["anything"]}, timeout=30)
        assert resp.status_code == 502
        assert "rejected the API key (HTTP 403)" in resp.json()["detail"]
    finally:
        server.stop()


def test_missing_key_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if k != "SERPER_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "stepsearch.search.server", "--online", "serper",
                           "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs an API key" in proc.stderr and "SERPER_API_KEY" in proc.stderr
