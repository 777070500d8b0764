"""The retrieval server's settings: `ServerConfig`, validated once at start-up. Each field carries its default and
the help of its flag; `server.py` builds the command line from them, so no default is written twice.

A server bound beyond loopback without a bearer token is refused unless `allow_unauthenticated` is set: anyone who
can reach the port could query it (and fill its cache).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields

from stepsearch.search.client import DEFAULT_MAX_QUERY_CHARS, TOKEN_ENV
from stepsearch.search.online import SERPER_KEY_ENV
from stepsearch.search.rerank import DEFAULT_NPROBE, DEFAULT_RERANK_CANDIDATES


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def setting(default, help: str = "", *, choices: tuple | None = None, cli: bool = True):
    """A ServerConfig field: its default, and the help and choices of its command-line flag (server.py builds the
    CLI from these, so a default is written once, here). cli=False: no flag (set another way, see the field)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs, validated once at start-up. Each field is one flag of
    `python -m stepsearch.search.server` (`--name VALUE`; a boolean that defaults to true is `--no_name`)."""

    index_dir: str | None = setting(None, "index folder written by stepsearch.search.build_index")
    online: str | None = setting(None, "serve web search results instead of a local index", choices=("serper",))
    host: str = setting("127.0.0.1", "bind address; another host than loopback needs a token (or "
                                     "--allow_unauthenticated)")
    port: int = setting(8000, "port to listen on")
    method: str | None = setting(None, "default: dense if the index has it", choices=("dense", "bm25", "hybrid"))
    encoder: str | None = setting(None, "query encoder; must match the index manifest (default: the manifest's)")
    encoder_mode: str = setting("fast", "query encoder path: fast (guarded bf16 with fp32 fallback on CPUs with "
                                        "native bf16, else sorted; fp16 on GPU), guarded, sorted, fp16, exact "
                                        "(Search-R1's fp32 path)")
    guard_eps: float | None = setting(None, "guarded mode: bf16 score gap below which a query is re-encoded in fp32 "
                                            "(default: the model's calibrated value)")
    guard_order: bool = setting(False, "guarded mode: keep fp32's top-k order, not only its set")
    encoder_backend: str = setting("auto", "who runs the query encoder: auto (our plain-torch BERT, native_bert.py, "
                                           "when the model is a BERT encoder it supports: the server never imports "
                                           "transformers and starts ~5 s sooner; else transformers, with the reason "
                                           "logged), native (refuse to start when unsupported), transformers",
                                   choices=("auto", "native", "transformers"))
    pack_tokens: bool = setting(True, "native encoder, every --encoder_mode but exact: run each micro-batch over its "
                                      "real tokens only, so padding costs no FLOPs (--no_pack_tokens: padded, as "
                                      "before; the same top-3, docs/retrieval_speed.md)")
    device: str = setting("cpu", "query encoder device: cpu or cuda[:N]")
    faiss_gpu: bool = setting(False, "put the dense index on every visible GPU (Search-R1's --faiss_gpu): through "
                                     "FAISS's GPU build when installed (faiss-gpu-cu12: Flat, SQ, IVF-Flat/SQ/PQ, the "
                                     "first stage of '+rerank'), else flat indexes through torch (gpu_index.py)")
    gpu_storage: str = setting("fp16", "--faiss_gpu: how the vectors are stored on the GPU (fp16 halves wiki-18/e5 "
                                       "to 32 GB; bf16 on the torch path only)", choices=("fp16", "bf16", "fp32"))
    faiss_gpu_replicate: bool = setting(False, "--faiss_gpu through FAISS's GPU build: a full copy of the index on "
                                               "every GPU, queries split between them, instead of its rows sharded "
                                               "over the GPUs (Search-R1's setting)")
    corpus: str | None = setting(None, "corpus file; refuse to start unless it matches the manifest's sha256")
    redis_url: str | None = setting(None, "e.g. redis://127.0.0.1:6379/0; omit for the in-process LRU only")
    cache_ttl_s: int = setting(7 * 24 * 3600, "Redis cache entry lifetime (s)")
    lru_size: int = setting(100_000, "entries of the in-process LRU cache")
    cache_normalization: str = setting("whitespace", "how a query is normalised into its cache key",
                                       choices=("whitespace", "squad"))
    default_topk: int = setting(3, "hits per query when a request gives no topk")
    max_topk: int = setting(100, "largest topk a request may ask for")
    max_queries: int = setting(4096, "most queries in one request")
    max_query_chars: int = setting(DEFAULT_MAX_QUERY_CHARS, "longest query accepted (characters)")
    max_batch_queries: int = setting(256, "most queries the batcher encodes at once")
    max_wait_ms: float = setting(2.0, "how long the batcher waits to fill a batch")
    coalesce: bool = setting(True, "coalesce concurrent requests into one batch (--no_coalesce: run each request "
                                   "alone, the benchmark baseline)")
    guard_pipeline: bool = setting(True, "guarded mode: run the bf16 pass and the fp32 fallback on two owner threads "
                                         "at once (batcher.GuardedPipelineBatcher); --no_guard_pipeline: one thread, "
                                         "one after the other")
    guard_workers: int = setting(2, "guarded mode: threads running the bf16 pass (the fp32 fallback has its own); 2 "
                                    "measured best on 2 cores (bench/results/retrieval.md)")
    encode_workers: int = setting(1, "sorted mode on CPU: threads encoding chunks of a batch at once, 1 torch thread "
                                     "each (batcher.GuardedPipelineBatcher without a fallback); 1 (default) = one "
                                     "owner thread with --torch_threads threads, best on idle cores; 0 = one per core "
                                     "this process may use, faster when other work shares the cores "
                                     "(docs/retrieval_speed.md)")
    torch_threads: int = setting(0, "intra-op threads for query encoding; 0 (default) = $OMP_NUM_THREADS if set, else "
                                    "every core this process may use (1 for the guarded pipeline and for "
                                    "--encode_workers other than 1); pass 1 when the "
                                    "cores are shared with the trainer (docs/retrieval.md)")
    nprobe: int = setting(DEFAULT_NPROBE, "IVF indexes: inverted lists visited per query (0: the value stored in the "
                                          "index file)")
    rerank_candidates: int = setting(DEFAULT_RERANK_CANDIDATES, "'+rerank' indexes: candidates from the compressed "
                                                                "index re-scored exactly per query")
    gil_switch_interval_ms: float = setting(0.5, "Python GIL switch interval of the server process (Python's "
                                                 "default: 5 ms; see server.main)")
    request_timeout_s: float = setting(120.0, "a /retrieve that takes longer answers 504 (the client retries it)")
    fast_lane: bool = setting(True, "answer /retrieve in a plain ASGI handler in front of FastAPI (fast_lane.py); "
                                    "--no_fast_lane: through FastAPI only (slower, same replies)")
    warm_up: bool = setting(True, "guarded mode: build the bf16 kernels for the common batch shapes in the "
                                  "background once the server answers (/health's warm_up: running, then done; "
                                  "--no_warm_up skips it)")
    max_body_bytes: int = setting(4 << 20, "largest /retrieve body accepted (413 beyond it, refused before it is "
                                           "read); 4 MiB holds the client's largest batch with room to spare")
    body_timeout_s: float = setting(10.0, "the whole /retrieve body must arrive within this time (else 408, "
                                          "connection closed)")
    token: str | None = setting(None, "bearer token; never a flag (it would show in ps): the CLI reads it from "
                                      "$token_env", cli=False)
    token_env: str = setting(TOKEN_ENV, "env var holding an optional bearer token")
    allow_unauthenticated: bool = setting(False, "allow a --host beyond loopback without a token (anyone who reaches "
                                                 "the port can query)")
    serper_api_key: str | None = setting(None, f"Serper key (default: ${SERPER_KEY_ENV})")
    serper_url: str = setting("https://google.serper.dev/search", "Serper endpoint")

    def __post_init__(self):
        if (self.index_dir is None) == (self.online is None):
            raise ValueError("[server] give exactly one of --index_dir DIR or --online serper")
        for f in fields(self):  # every setting with choices (a None default stays allowed)
            value, choices = getattr(self, f.name), f.metadata["choices"]
            if choices and value not in choices and not (value is None and f.default is None):
                raise ValueError(f"[server] --{f.name} must be one of {', '.join(choices)}, got {value!r}")
        for name in ("default_topk", "max_topk", "max_queries", "max_query_chars", "request_timeout_s",
                     "gil_switch_interval_ms", "max_body_bytes", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"[server] --{name} must be positive, got {getattr(self, name)}")
        if self.guard_workers <= 0:
            raise ValueError(f"[server] --guard_workers must be positive, got {self.guard_workers}")
        if self.encode_workers < 0:
            raise ValueError(f"[server] --encode_workers must be >= 0, got {self.encode_workers}")
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
