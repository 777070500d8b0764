"""Retrieval server: `python -m stepsearch.search.server --index_dir DIR [--host 127.0.0.1] [--port 8000]
[--redis_url redis://127.0.0.1:6379/0]`, or `--online serper` for web search behind the same contract.

`main` parses flags (one per `ServerConfig` field, built from the schema) into a frozen `ServerConfig`, opens the
backend (refusing a missing, stale or mismatched index, or a non-loopback host without a token, before the port is
bound), then serves `create_app` behind `FastLane`.
The pieces, one concern per file (see docs/retrieval.md for the contract and its limits):
    server_config.py     ServerConfig: every setting, its default and its flag's help, checked at start-up
    request_check.py     parse_retrieve: the one validation of a /retrieve body; the error format; the schema
    retrieve_handler.py  handle_retrieve: token, content type, body size/time caps, validation, execution
    service.py           backends, RetrievalService (cache, dedupe, search), execute
    server_app.py        create_app: FastAPI routes, lifespan, OpenAPI statuses
    fast_lane.py         FastLane: POST /retrieve straight to handle_retrieve, the rest to FastAPI
"""
from __future__ import annotations

import argparse
import dataclasses
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
def _flag_type(annotation: str):
    """The argparse type of a ServerConfig annotation ("int", "float | None", "str | None", ...)."""
    base = annotation.replace(" | None", "")
    return {"int": int, "float": float, "str": str}[base]


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per ServerConfig field (default, help and choices from the field; a boolean that
    defaults to true is `--no_<name>`), plus the two flags that are not settings: --check_only and --log_level."""
    p = argparse.ArgumentParser(description="StepSearch retrieval server (Search-R1 /retrieve contract)")
    for f in dataclasses.fields(ServerConfig):
        meta = f.metadata
        if not meta["cli"]:
            continue
        if f.type == "bool":
            flag = f"--no_{f.name}" if f.default else f"--{f.name}"
            p.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                           default=f.default, help=meta["help"])
        else:
            p.add_argument(f"--{f.name}", type=_flag_type(f.type), default=f.default, choices=meta["choices"],
                           help=meta["help"] + (f" (default: {f.default})" if f.default is not None else ""))
    p.add_argument("--check_only", action="store_true", help="verify the index and encoder, then exit")
    p.add_argument("--log_level", default="info", help="logging level (default: info)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """(ServerConfig, the parsed flags). The bearer token is read from the environment variable --token_env names,
    never from the command line (where `ps` would show it)."""
    a = build_parser().parse_args(argv)
    settings = {f.name: getattr(a, f.name) for f in dataclasses.fields(ServerConfig) if f.metadata["cli"]}
    return ServerConfig(**settings, token=os.environ.get(a.token_env) or None), a


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
