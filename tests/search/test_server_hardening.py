"""Hostile-but-fair input against two real uvicorn servers on 127.0.0.1 (BM25 over the wiki-18 sample, a bearer
token): one with the fast lane, one FastAPI only. Every bad request gets a small 4xx with a clear `detail`,
identical on both paths; oversize and slow bodies are refused without being held; /health keeps answering.
Expected statuses and messages are the documented contract (docs/retrieval.md, "Limits and bad input")."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from stepsearch.search.server import ServerConfig, main
from stepsearch.search.testing import REPO_ROOT, free_port, start_retrieval_server

pytestmark = pytest.mark.timeout(300)

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json", **AUTH}
BODY_TIMEOUT_S = 1.0  # the servers' --body_timeout_s (short, so the slow-body tests stay fast)
MAX_BODY = 4 << 20  # the default --max_body_bytes
TESTER_BODY = json.dumps({"queries": [0] * 1_000_000}).encode()  # issue 19's case: 3 MB, 21.8 s, a 161 MB reply


@pytest.fixture(scope="module")
def servers(wiki_index_dir):
    """{"fast": url, "plain": url}: the same BM25 index behind the fast lane and behind FastAPI only."""
    common = ["--method", "bm25", "--body_timeout_s", str(BODY_TIMEOUT_S), "--no_warm_up"]
    env = {"STEPSEARCH_RETRIEVAL_TOKEN": TOKEN}
    fast = start_retrieval_server(wiki_index_dir, extra_args=common, env=env)
    try:
        plain = start_retrieval_server(wiki_index_dir, extra_args=common + ["--no_fast_lane"], env=env)
        try:
            yield {"fast": fast.url, "plain": plain.url}
        finally:
            plain.stop()
    finally:
        fast.stop()


def post_both(servers, content: bytes, headers=JSON) -> dict[str, httpx.Response]:
    return {name: httpx.post(url + "/retrieve", content=content, headers=headers, timeout=30)
            for name, url in servers.items()}


def nested(depth: int) -> bytes:
    return b'{"queries": ' + b"[" * depth + b"]" * depth + b"}"


# (name, raw body, headers, status, words the detail must contain)
BAD = [
    ("nested 10,000 deep", nested(10_000), JSON, 400, "nested too deep"),
    ("nested 10,000 deep, no token", nested(10_000), {"content-type": "application/json"}, 401, "bearer token"),
    ("lone surrogate", b'{"queries": ["ok", "\\ud800"]}', JSON, 422, "queries[1] is not valid Unicode"),
    ("topk NaN", b'{"queries": ["a"], "topk": NaN}', JSON, 400, "NaN is not valid JSON"),
    ("topk Infinity", b'{"queries": ["a"], "topk": Infinity}', JSON, 400, "Infinity is not valid JSON"),
    ("topk -Infinity", b'{"queries": ["a"], "topk": -Infinity}', JSON, 400, "-Infinity is not valid JSON"),
    ("topk 1e400", b'{"queries": ["a"], "topk": 1e400}', JSON, 422, "topk: must be an integer"),
    ("content-type jsonx", b'{"queries": ["a"]}', {"content-type": "application/jsonx", **AUTH}, 415,
     "content-type must be application/json"),
    ("content-type text", b'{"queries": ["a"]}', {"content-type": "text/plain", **AUTH}, 415, "got 'text/plain'"),
    ("not UTF-8", b'{"queries": ["\xff"]}', JSON, 400, "malformed JSON"),
    ("300,000 items", b'{"queries": [' + b",".join([b"0"] * 300_000) + b"]}", JSON, 422,
     "too many queries: 300000 > max 4096"),
    ("4,096 bad items", json.dumps({"queries": [0] * 4096}).encode(), JSON, 422, "; and 4091 more"),
    ("1,000,000 items", TESTER_BODY, JSON, 422, "too many queries: 1000000 > max 4096"),
    ("5 MiB body", b'{"queries": ["' + b"x" * (5 << 20) + b'"]}', JSON, 413,
     f"request body of {(5 << 20) + 17} bytes exceeds the server's max of {MAX_BODY} bytes"),
    ("no token, 1 MiB body", b'{"queries": ["' + b"x" * (1 << 20) + b'"]}', {"content-type": "application/json"},
     401, "bearer token"),
]


@pytest.mark.parametrize("name, body, headers, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_the_same_small_4xx_on_both_paths(servers, name, body, headers, status, words):
    replies = post_both(servers, body, headers)
    for path, resp in replies.items():
        assert resp.status_code == status, (path, resp.text[:300])
        assert words in resp.json()["detail"], (path, resp.text[:300])
        assert len(resp.content) < 1000, (path, len(resp.content))  # bounded echo and error count
    assert replies["fast"].json() == replies["plain"].json()
    for url in servers.values():  # still serving
        assert httpx.post(url + "/retrieve", json={"queries": ["Evan Morris"], "topk": 1}, headers=AUTH).status_code == 200


def raw_request(url: str, head: bytes, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head + body)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float) -> bytes:
    """Everything the server sends until it closes the connection (raises if it is still open after limit_s)."""
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def head(length: int | None, chunked: bool = False, close: bool = False) -> bytes:
    """Request head; close=True asks the server to close after replying (else closing is the server's choice)."""
    lines = [b"POST /retrieve HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json",
             b"Authorization: Bearer " + TOKEN.encode()] + ([b"Connection: close"] if close else [])
    lines += [b"Content-Length: %d" % length] if length is not None else []
    lines += [b"Transfer-Encoding: chunked"] if chunked else []
    return b"\r\n".join(lines) + b"\r\n\r\n"


def send_tolerant(sock: socket.socket, data: bytes) -> None:
    """Send what the server takes; it may answer and close before the whole body is sent (that is the point)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


@pytest.mark.parametrize("path", ["fast", "plain"])
def test_the_testers_million_items_get_a_fast_small_4xx_while_health_answers(servers, path):
    url = servers[path]
    health_ms: list[float] = []
    stop = threading.Event()

    def probe():
        while not stop.is_set() and len(health_ms) < 100:  # bounded
            t = time.perf_counter()
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            health_ms.append((time.perf_counter() - t) * 1000)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        t0 = time.perf_counter()
        resp = httpx.post(url + "/retrieve", content=TESTER_BODY, headers=JSON, timeout=30)
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        prober.join(30)
    assert resp.status_code == 422 and len(resp.content) < 200, resp.text[:300]
    assert elapsed < 5.0, elapsed
    assert health_ms and max(health_ms) < 5000, max(health_ms)


@pytest.mark.parametrize("path", ["fast", "plain"])
def test_announced_oversize_body_is_refused_before_it_is_sent(servers, path):
    sock = raw_request(servers[path], head(50_000_000), b'{"queries": [')  # 50 MB announced, 13 bytes sent
    t0 = time.perf_counter()
    with sock:
        reply = read_until_closed(sock, limit_s=5)  # the server closes: no waiting for the body timeout
    assert time.perf_counter() - t0 < BODY_TIMEOUT_S
    assert reply.startswith(b"HTTP/1.1 413") and b"50000000 bytes exceeds" in reply


@pytest.mark.parametrize("path", ["fast", "plain"])
def test_chunked_body_is_cut_off_at_the_cap(servers, path):
    piece = b"x" * 65536
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sock = raw_request(servers[path], head(None, chunked=True, close=True))
    with sock:  # 6 MiB: past the cap, drained unread, then the reply
        send_tolerant(sock, chunk * (6 * (1 << 20) // len(piece)) + b"0\r\n\r\n")
        reply = read_until_closed(sock, limit_s=10)
    assert reply.startswith(b"HTTP/1.1 413") and b"--max_body_bytes" in reply


@pytest.mark.parametrize("path", ["fast", "plain"])
def test_slow_bodies_are_dropped_after_the_timeout_and_do_not_pile_up(servers, path):
    """50 clients announce 100 bytes and send 10: each gets a 408 and a closed connection within the timeout."""
    socks = [raw_request(servers[path], head(100), b'{"queries"') for _ in range(50)]
    t0 = time.perf_counter()
    try:
        replies = [read_until_closed(s, limit_s=BODY_TIMEOUT_S + 10) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert time.perf_counter() - t0 < BODY_TIMEOUT_S + 10
    assert all(r.startswith(b"HTTP/1.1 408") for r in replies), replies[0][:200]
    assert b"10 bytes of 100 arrived" in replies[0]
    assert httpx.get(servers[path] + "/health", timeout=10).status_code == 200


def test_openapi_documents_every_status_with_the_real_detail_shape(servers):
    for url in servers.values():
        spec = httpx.get(url + "/openapi.json", timeout=10).json()
        responses = spec["paths"]["/retrieve"]["post"]["responses"]
        assert set(responses) == {"200", "400", "401", "408", "413", "415", "422", "500", "502", "504"}
        error_schema = spec["components"]["schemas"]["ErrorResponse"]
        assert error_schema["properties"]["detail"]["type"] == "string"
        for status in set(responses) - {"200"}:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse"
        assert "HTTPValidationError" not in spec["components"]["schemas"]
        body = spec["paths"]["/retrieve"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["queries"]["maxItems"] == 4096
        assert set(spec["paths"]["/stats"]["get"]["responses"]) == {"200", "401"}


@pytest.mark.parametrize("argv_extra, env, ok", [
    ([], {}, False),
    (["--token_env", "STEPSEARCH_TOKEN_TYPO"], {"STEPSEARCH_RETRIEVAL_TOKEN": "x"}, False),
    (["--allow_unauthenticated"], {}, True),
    ([], {"STEPSEARCH_RETRIEVAL_TOKEN": "x"}, True),
])
def test_non_loopback_host_needs_a_token(wiki_index_dir, monkeypatch, capsys, argv_extra, env, ok):
    monkeypatch.delenv("STEPSEARCH_RETRIEVAL_TOKEN", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code = main(["--index_dir", wiki_index_dir, "--method", "bm25", "--host", "0.0.0.0", "--check_only",
                 *argv_extra])
    err = capsys.readouterr().err
    if ok:
        assert code == 0, err
    else:
        assert code == 2 and "refusing to bind 0.0.0.0 without a bearer token" in err
        assert ("STEPSEARCH_TOKEN_TYPO" if argv_extra else "STEPSEARCH_RETRIEVAL_TOKEN") in err
        assert "--allow_unauthenticated" in err


def test_loopback_hosts_need_no_token():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert ServerConfig(index_dir="unused", host=host).token is None
    with pytest.raises(ValueError, match="refusing to bind 10.0.0.5"):
        ServerConfig(index_dir="unused", host="10.0.0.5")


def test_the_process_refuses_before_binding():
    """The CLI itself (a subprocess): exit 2 and the reason on stderr, without loading any index."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "stepsearch.search.server", "--index_dir", "/nonexistent",
                           "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "without a bearer token" in proc.stderr


def test_launch_script_refuses_an_exposed_host_without_a_token(wiki_index_dir):
    env = {k: v for k, v in os.environ.items() if k != "STEPSEARCH_RETRIEVAL_TOKEN"}
    env.update(HOST="0.0.0.0", PORT=str(free_port()), NO_REDIS="1",
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", "launch_retrieval.sh", wiki_index_dir, "--method", "bm25"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2 and "refusing to bind 0.0.0.0 without a bearer token" in proc.stderr
