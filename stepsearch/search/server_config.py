"""The retrieval server's settings: `ServerConfig`, validated once at start-up (the CLI in `server.py` fills it).

A server bound beyond loopback without a bearer token is refused unless `allow_unauthenticated` is set: anyone who
can reach the port could query it (and fill its cache).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from stepsearch.search.client import DEFAULT_MAX_QUERY_CHARS, TOKEN_ENV
from stepsearch.search.rerank import DEFAULT_NPROBE, DEFAULT_RERANK_CANDIDATES


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs, validated once at start-up."""

    index_dir: str | None = None
    online: str | None = None  # None (local index) or "serper"
    host: str = "127.0.0.1"
    port: int = 8000
    method: str | None = None  # dense | bm25 | hybrid; None: dense when built
    encoder: str | None = None  # must match the manifest's encoder
    # fast: guarded bf16 + fp32 fallback on CPUs with native bf16 (else sorted fp32), fp16 on GPU; exact: fp32
    encoder_mode: str = "fast"
    guard_eps: float | None = None  # guarded: score gap that triggers the fp32 fallback (None: calibrated value)
    guard_order: bool = False  # guarded: also keep the fp32 top-k order, not only the id set
    device: str = "cpu"
    # dense flat index on every visible GPU (Search-R1's --faiss_gpu), vectors stored as gpu_storage (fp16 halves
    # wiki-18/e5 to 32 GB); see gpu_index.TorchFlatIndex
    faiss_gpu: bool = False
    gpu_storage: str = "fp16"
    corpus: str | None = None  # if given, must match the manifest's corpus sha256
    redis_url: str | None = None
    cache_ttl_s: int = 7 * 24 * 3600
    lru_size: int = 100_000
    cache_normalization: str = "whitespace"
    default_topk: int = 3
    max_topk: int = 100
    max_queries: int = 4096
    max_query_chars: int = DEFAULT_MAX_QUERY_CHARS
    max_batch_queries: int = 256
    max_wait_ms: float = 2.0
    coalesce: bool = True
    # guarded mode: run the bf16 pass and the fp32 fallback pass on two owner threads at once
    # (batcher.GuardedPipelineBatcher); off: both on one thread, one after the other
    guard_pipeline: bool = True
    # guarded pipeline: threads running the bf16 pass (1 torch thread each, plus the fp32 thread); 2 measured best
    # on the 2-core machine (bench/results/retrieval.md); on a dedicated many-core node give it more
    guard_workers: int = 2
    # torch intra-op threads for query encoding. 0 (auto): $OMP_NUM_THREADS when set, else every core this process
    # may run on (os.sched_getaffinity), except 1 for the guarded pipeline (its parallelism is its worker threads).
    # Pass 1 when the node's cores are shared with the trainer/rollout: oversubscribed OpenMP threads stall each
    # other (docs/retrieval.md)
    torch_threads: int = 0
    # IVF indexes: inverted lists visited per query (0: the value stored in the index file)
    nprobe: int = DEFAULT_NPROBE
    # "+rerank" indexes: candidates from the compressed index re-scored exactly against the fp16 vectors
    rerank_candidates: int = DEFAULT_RERANK_CANDIDATES
    # Python GIL switch interval for the server process (default 5 ms; see main)
    gil_switch_interval_ms: float = 0.5
    # a /retrieve that takes longer answers 504 (the client retries it)
    request_timeout_s: float = 120.0
    # answer well-formed /retrieve requests in a plain ASGI handler in front of FastAPI (see FastLane)
    fast_lane: bool = True
    # guarded mode: build the bf16 kernels for the common batch shapes at start-up (Encoder.warm_up_bf16)
    warm_up: bool = True
    # request body limits (413 past max_body_bytes; 408 and the connection closed when the whole body has not
    # arrived within body_timeout_s), checked before any JSON is parsed. 4 MiB holds the client's largest batch
    # (256 queries of max_query_chars 4096) with room to spare
    max_body_bytes: int = 4 << 20
    body_timeout_s: float = 10.0
    token: str | None = None
    token_env: str = TOKEN_ENV  # the environment variable the CLI read `token` from (named in errors)
    allow_unauthenticated: bool = False  # allow a non-loopback host without a token
    serper_api_key: str | None = None
    serper_url: str = "https://google.serper.dev/search"

    def __post_init__(self):
        if (self.index_dir is None) == (self.online is None):
            raise ValueError("[server] give exactly one of --index_dir DIR or --online serper")
        if self.online not in (None, "serper"):
            raise ValueError(f"[server] --online must be 'serper', got {self.online!r}")
        for name in ("default_topk", "max_topk", "max_queries", "max_query_chars", "request_timeout_s",
                     "gil_switch_interval_ms", "max_body_bytes", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"[server] --{name} must be positive, got {getattr(self, name)}")
        if self.guard_workers <= 0:
            raise ValueError(f"[server] --guard_workers must be positive, got {self.guard_workers}")
        if self.gpu_storage not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"[server] --gpu_storage must be fp16, bf16 or fp32, got {self.gpu_storage!r}")
        if self.torch_threads < 0:
            raise ValueError(f"[server] --torch_threads must be >= 0, got {self.torch_threads}")
        if self.nprobe < 0:
            raise ValueError(f"[server] --nprobe must be >= 0, got {self.nprobe}")
        if self.rerank_candidates <= 0:
            raise ValueError(f"[server] --rerank_candidates must be positive, got {self.rerank_candidates}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"[server] --default_topk ({self.default_topk}) exceeds --max_topk ({self.max_topk})")
        if not is_loopback(self.host) and self.token is None and not self.allow_unauthenticated:
            raise ValueError(f"[server] refusing to bind {self.host} without a bearer token: ${self.token_env} is "
                             f"not set or empty, so anyone who can reach the port could query it. Export "
                             f"{self.token_env}=<secret> (or name another variable with --token_env), bind "
                             f"127.0.0.1, or pass --allow_unauthenticated to serve without a token")
