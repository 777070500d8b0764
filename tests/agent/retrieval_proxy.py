"""A loopback HTTP proxy in front of the real retrieval server, for tests and the rollout bench: it forwards
`POST /retrieve` unchanged after a per-request delay, and answers 503 (a transient failure the client retries) for
requests holding a query that contains one of `fail_words`.

    with RetrievalProxy(server.url, delay_s=lambda queries: 0.05, fail_words=("Genentech",)) as proxy:
        client = RetrievalClient(proxy.url)

The delay models a retriever slower than the 1000-passage test index (a large index on a shared node); each request
is handled on its own thread, so delays overlap as they would on a real server.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

import httpx


class RetrievalProxy:
    def __init__(self, upstream: str, delay_s: Callable[[list[str]], float] = lambda queries: 0.0,
                 fail_words: Sequence[str] = ()):
        self.upstream = upstream.rstrip("/")
        self.delay_s = delay_s
        self.fail_words = tuple(fail_words)
        self.requests: list[tuple[float, list[str], int]] = []  # (arrival time, queries, status)
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=120.0)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                queries = list(json.loads(body).get("queries", []))
                failing = any(w in q for q in queries for w in proxy.fail_words)
                status, data = 503, b'{"detail": "injected failure"}'
                if not failing:
                    time.sleep(proxy.delay_s(queries))
                    resp = proxy._http.post(proxy.upstream + self.path, content=body,
                                            headers={"Content-Type": "application/json"})
                    status, data = resp.status_code, resp.content
                with proxy._lock:
                    proxy.requests.append((time.perf_counter(), queries, status))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def __enter__(self) -> "RetrievalProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()
