"""The FastAPI application: routes, lifespan (batcher, cache, warm-up) and the OpenAPI schema.

`POST /retrieve` keeps Search-R1's contract:
    request  {"queries": [str, ...], "topk": 3, "return_scores": true}
    response {"result": [[{"document": row, "score": float}, ...] per query]}   (return_scores true)
             {"result": [[row, ...] per query]}                                (return_scores false)
Every row has `id`, `title`, `text`, `contents` ('"Title"\\ntext') plus the corpus' original fields.
`GET /health` (no auth) and `GET /stats` (requests, queries, cache hits/misses, latency percentiles, batch sizes).
The route hands the raw request to `retrieve_handler.handle_retrieve` (the path the fast lane uses too), so the
OpenAPI request body and every status it can answer are declared here by hand, with the real `detail` shape.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from stepsearch.search.request_check import ErrorResponse, RequestError, RetrieveResponse, request_schema
from stepsearch.search.retrieve_handler import check_token, handle_retrieve
from stepsearch.search.server_config import ServerConfig
from stepsearch.search.service import LocalBackend, RetrievalService

logger = logging.getLogger("stepsearch.search.server")


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


AUTH_ERROR = {401: _error("missing or wrong bearer token (only when the server has one)")}
RETRIEVE_ERRORS = {
    **AUTH_ERROR,
    400: _error("malformed JSON: syntax, not UTF-8, NaN/Infinity, nested too deep; or a bad Content-Length"),
    408: _error("the whole body did not arrive within --body_timeout_s (the connection is closed)"),
    413: _error("body larger than --max_body_bytes (refused before it is read; the connection is closed)"),
    415: _error("content-type other than application/json"),
    422: _error("a field breaks the rules: names up to 5 fields, e.g. 'queries[2] is empty or whitespace'"),
    500: _error("the search itself failed (a bug or a broken index)"),
    502: _error("online backend: the upstream search API failed"),
    504: _error("retrieval took longer than --request_timeout_s"),
}


def get_service(request: Request) -> RetrievalService:
    return request.app.state.service


def require_token(request: Request) -> None:
    """FastAPI dependency over retrieve_handler.check_token (for /stats); RequestError becomes its reply."""
    check_token({k.encode("latin-1"): v.encode("latin-1") for k, v in request.headers.items()},
                request.app.state.config)


def as_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
    """A (status, ASGI headers, body) reply as a Starlette Response (which sets its own content-length)."""
    return Response(body, status_code=status,
                    headers={k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k != b"content-length"})


async def _request_error(request: Request, exc: RequestError) -> Response:
    return as_response(*exc.response())


def create_app(cfg: ServerConfig, backend) -> FastAPI:
    """App over an opened backend (`service.open_backend(cfg)`); the batcher and cache start in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.start()
        service = RetrievalService(cfg, backend)
        app.state.service = service
        if isinstance(backend, LocalBackend):
            await asyncio.to_thread(backend.warm_up)  # first encode allocates; keep it off the first request
            if cfg.warm_up:  # guarded mode: bf16 kernels for the common shapes, in the background
                backend.start_bf16_warm_up()
        logger.info("retrieval server ready: %s", backend.health())
        yield
        await backend.aclose()

    app = FastAPI(title="StepSearch retrieval", lifespan=lifespan)
    app.state.config = cfg
    app.add_exception_handler(RequestError, _request_error)
    body_doc = {"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(cfg)}}}}

    @app.post("/retrieve", response_model=RetrieveResponse, responses=RETRIEVE_ERRORS, openapi_extra=body_doc)
    async def retrieve(request: Request, service: RetrievalService = Depends(get_service)) -> Response:
        return as_response(*await handle_retrieve(request.scope, request.receive, service))

    @app.get("/health")
    async def health(service: RetrievalService = Depends(get_service)) -> dict:
        return await asyncio.to_thread(service.health)

    @app.get("/stats", dependencies=[Depends(require_token)], responses=AUTH_ERROR)
    async def stats(service: RetrievalService = Depends(get_service)) -> dict:
        return service.stats()

    return app
