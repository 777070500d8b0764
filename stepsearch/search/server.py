"""Retrieval server: `python -m stepsearch.search.server --index_dir DIR [--host 127.0.0.1] [--port 8000]
[--redis_url redis://127.0.0.1:6379/0]`, or `--online serper` for web search behind the same contract.

`main` parses flags into a frozen `ServerConfig`, opens the backend (refusing a missing, stale or mismatched index,
or a non-loopback host without a token, before the port is bound), then serves `create_app` behind `FastLane`.
The pieces, one concern per file (see docs/retrieval.md for the contract and its limits):
    server_config.py     ServerConfig: every setting and its default, checked at start-up
    request_check.py     parse_retrieve: the one validation of a /retrieve body; the error format; the schema
    retrieve_handler.py  handle_retrieve: token, content type, body size/time caps, validation, execution
    service.py           backends, RetrievalService (cache, dedupe, search), execute
    server_app.py        create_app: FastAPI routes, lifespan, OpenAPI statuses
    fast_lane.py         FastLane: POST /retrieve straight to handle_retrieve, the rest to FastAPI
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from stepsearch.search.fast_lane import FastLane
from stepsearch.search.index import IndexLoadError
from stepsearch.search.request_check import RetrieveCall, parse_fast, parse_retrieve
from stepsearch.search.server_app import create_app
from stepsearch.search.server_config import ServerConfig, is_loopback
from stepsearch.search.service import LocalBackend, OnlineBackend, RetrievalService, open_backend

__all__ = ["FastLane", "LocalBackend", "OnlineBackend", "RetrievalService", "RetrieveCall", "ServerConfig",
           "create_app", "main", "open_backend", "parse_args", "parse_fast", "parse_retrieve"]
logger = logging.getLogger("stepsearch.search.server")


# ---------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    d = ServerConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description="StepSearch retrieval server (Search-R1 /retrieve contract)")
    p.add_argument("--index_dir", help="index folder written by stepsearch.search.build_index")
    p.add_argument("--online", choices=("serper",), help="serve web search results instead of a local index")
    p.add_argument("--host", default=d["host"].default,
                   help="bind address; another host than loopback needs a token (or --allow_unauthenticated)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--method", choices=("dense", "bm25", "hybrid"), help="default: dense if the index has it")
    p.add_argument("--encoder", help="query encoder; must match the index manifest (default: the manifest's)")
    p.add_argument("--encoder_mode", default=d["encoder_mode"].default,
                   help="query encoder path: fast (default: guarded bf16 with fp32 fallback on CPUs with native bf16, "
                        "else sorted; fp16 on GPU), guarded, sorted, fp16, exact (Search-R1's fp32 path)")
    p.add_argument("--guard_eps", type=float, help="guarded mode: bf16 score gap below which a query is re-encoded "
                                                   "in fp32 (default: the model's calibrated value)")
    p.add_argument("--guard_order", action="store_true", help="guarded mode: keep fp32's top-k order, not only its set")
    p.add_argument("--device", default="cpu", help="query encoder device: cpu or cuda[:N]")
    p.add_argument("--faiss_gpu", action="store_true", help="put the dense (flat) index on every visible GPU")
    p.add_argument("--gpu_storage", default="fp16", choices=("fp16", "bf16", "fp32"),
                   help="--faiss_gpu: how the vectors are stored on the GPU")
    p.add_argument("--corpus", help="corpus file; refuse to start unless it matches the manifest's sha256")
    p.add_argument("--redis_url", help="e.g. redis://127.0.0.1:6379/0; omit for the in-process LRU only")
    p.add_argument("--cache_ttl_s", type=int, default=d["cache_ttl_s"].default)
    p.add_argument("--lru_size", type=int, default=d["lru_size"].default)
    p.add_argument("--cache_normalization", default="whitespace", choices=("whitespace", "squad"))
    p.add_argument("--default_topk", type=int, default=3)
    p.add_argument("--max_topk", type=int, default=d["max_topk"].default)
    p.add_argument("--max_queries", type=int, default=d["max_queries"].default)
    p.add_argument("--max_query_chars", type=int, default=d["max_query_chars"].default)
    p.add_argument("--max_batch_queries", type=int, default=d["max_batch_queries"].default)
    p.add_argument("--max_wait_ms", type=float, default=d["max_wait_ms"].default)
    p.add_argument("--no_coalesce", action="store_true", help="run each request alone (benchmark baseline)")
    p.add_argument("--no_guard_pipeline", action="store_true",
                   help="guarded mode: run the fp32 fallback on the same thread as the bf16 pass")
    p.add_argument("--guard_workers", type=int, default=d["guard_workers"].default,
                   help="guarded mode: threads running the bf16 pass (the fp32 fallback has its own)")
    p.add_argument("--request_timeout_s", type=float, default=d["request_timeout_s"].default)
    p.add_argument("--no_fast_lane", action="store_true", help="serve /retrieve through FastAPI only (slower)")
    p.add_argument("--no_warm_up", action="store_true", help="guarded mode: skip the bf16 shape warm-up at start-up")
    p.add_argument("--torch_threads", type=int, default=d["torch_threads"].default,
                   help="intra-op threads for query encoding; 0 (default) = $OMP_NUM_THREADS if set, else every core "
                        "this process may use (1 for the guarded pipeline); pass 1 when the cores are shared with "
                        "the trainer")
    p.add_argument("--nprobe", type=int, default=d["nprobe"].default,
                   help="IVF indexes: inverted lists visited per query (0: the value stored in the index file)")
    p.add_argument("--rerank_candidates", type=int, default=d["rerank_candidates"].default,
                   help="'+rerank' indexes: candidates from the compressed index re-scored exactly per query")
    p.add_argument("--gil_switch_interval_ms", type=float, default=d["gil_switch_interval_ms"].default)
    p.add_argument("--max_body_bytes", type=int, default=d["max_body_bytes"].default,
                   help="largest /retrieve body accepted (413 beyond it, refused before it is read)")
    p.add_argument("--body_timeout_s", type=float, default=d["body_timeout_s"].default,
                   help="the whole /retrieve body must arrive within this time (else 408, connection closed)")
    p.add_argument("--token_env", default=d["token_env"].default, help="env var holding an optional bearer token")
    p.add_argument("--allow_unauthenticated", action="store_true",
                   help="allow a --host beyond loopback without a token (anyone who reaches the port can query)")
    p.add_argument("--serper_api_key", help=f"Serper key (default: $SERPER_API_KEY)")
    p.add_argument("--serper_url", default=d["serper_url"].default)
    p.add_argument("--check_only", action="store_true", help="verify the index and encoder, then exit")
    p.add_argument("--log_level", default="info")
    a = p.parse_args(argv)
    cfg = ServerConfig(index_dir=a.index_dir, online=a.online, host=a.host, port=a.port, method=a.method,
                       encoder=a.encoder, encoder_mode=a.encoder_mode, guard_eps=a.guard_eps,
                       guard_order=a.guard_order, device=a.device, faiss_gpu=a.faiss_gpu,
                       gpu_storage=a.gpu_storage, corpus=a.corpus, fast_lane=not a.no_fast_lane,
                       warm_up=not a.no_warm_up,
                       redis_url=a.redis_url, cache_ttl_s=a.cache_ttl_s, lru_size=a.lru_size,
                       cache_normalization=a.cache_normalization, default_topk=a.default_topk, max_topk=a.max_topk,
                       max_queries=a.max_queries, max_query_chars=a.max_query_chars,
                       max_batch_queries=a.max_batch_queries, max_wait_ms=a.max_wait_ms, coalesce=not a.no_coalesce,
                       guard_pipeline=not a.no_guard_pipeline, guard_workers=a.guard_workers,
                       request_timeout_s=a.request_timeout_s, max_body_bytes=a.max_body_bytes,
                       body_timeout_s=a.body_timeout_s, gil_switch_interval_ms=a.gil_switch_interval_ms,
                       torch_threads=a.torch_threads, nprobe=a.nprobe, rerank_candidates=a.rerank_candidates,
                       token=os.environ.get(a.token_env) or None, token_env=a.token_env,
                       allow_unauthenticated=a.allow_unauthenticated, serper_api_key=a.serper_api_key,
                       serper_url=a.serper_url)
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        backend = open_backend(cfg)
    except (IndexLoadError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"[server] refusing to start: {exc}", file=sys.stderr)
        return 2
    if args.check_only:
        print(f"[server] index ok: {json.dumps(backend.health())}")
        return 0
    if not is_loopback(cfg.host) and cfg.token is None:  # only with --allow_unauthenticated
        logger.warning("binding %s without a bearer token: anyone who can reach this port can query", cfg.host)
    # The owner thread releases the GIL inside every torch/faiss op and must win it back for the next op. With
    # Python's default 5 ms switch interval a busy event loop makes each reacquisition wait up to 5 ms (a GIL
    # convoy: ~1 s per MiniLM batch under load); a short interval lets the owner thread back in promptly.
    sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000.0)
    import uvicorn

    app = create_app(cfg, backend)
    uvicorn.run(FastLane(app) if cfg.fast_lane else app, host=cfg.host, port=cfg.port, log_level="warning",
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
