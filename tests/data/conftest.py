"""Fixtures of the data-pipeline tests: sample paths and a real uvicorn stand-in chat server on 127.0.0.1."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "data" / "samples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chat_server():
    """Base URL (…/v1) of the stand-in OpenAI-compatible server, started in a subprocess and killed after."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.data.openai_standin:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(base + "/stats", timeout=1.0).raise_for_status()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("stand-in chat server did not start")
                time.sleep(0.1)
        yield base + "/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def served_requests(base_v1: str) -> int:
    return httpx.get(base_v1.removesuffix("/v1") + "/stats", timeout=5).json()["requests"]
