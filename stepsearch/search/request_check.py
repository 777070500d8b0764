"""The one validation of a `POST /retrieve` body, and the one error format, shared by the fast lane and FastAPI.

    call = parse_retrieve(body, cfg)        # RetrieveCall(queries, topk, return_scores), or raises RequestError
    status, headers, body = exc.response()  # {"detail": "<what is wrong, naming the field>"}

Checks run cheapest first, so no request costs more than its size: the body size and content type before the
body is read (`retrieve_handler`), then JSON (400: malformed, NaN/Infinity, nested too deep, not UTF-8), then the
shape of the object and the query-count cap, and only then one pass over the items (422). An error body lists at
most `MAX_FIELD_ERRORS` problems, each echoing at most `ECHO_CHARS` characters of the input, so a bad request of
4,096 items gets a reply of a few hundred bytes.
"""
from __future__ import annotations

import json
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from stepsearch.search.server_config import ServerConfig

MAX_FIELD_ERRORS = 5
"""A 422 names at most this many bad fields, then says how many more there were."""
ECHO_CHARS = 60
"""An error echoes at most this many characters of the offending input (its repr, cut)."""


class RetrieveCall(NamedTuple):
    queries: list[str]
    topk: int
    return_scores: bool


class RequestError(Exception):
    """A request the server refuses: HTTP `status` with a one-string `detail`. `close` asks the server to drop
    the connection after answering (the body was not read in full, or arrived too slowly)."""

    def __init__(self, status: int, detail: str, close: bool = False, headers: tuple = ()):
        super().__init__(detail)
        self.status, self.detail, self.close, self.headers = status, detail, close, tuple(headers)

    def response(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, ASGI headers, body) of the error reply; every 4xx/5xx the server writes goes through here."""
        body = error_body(self.detail)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *self.headers]
        if self.close:
            headers.append((b"connection", b"close"))
        return self.status, headers, body


def error_body(detail: str) -> bytes:
    """`{"detail": detail}` as JSON bytes (ASCII, so a lone surrogate in an echo cannot break the encoding)."""
    return json.dumps({"detail": detail}).encode()


def echo(value) -> str:
    """The input as the error shows it: its repr, cut to ECHO_CHARS characters."""
    text = repr(value) if not isinstance(value, (list, dict)) else f"{type(value).__name__} of {len(value)}"
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "...'"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (RFC 8259); send a finite number")


def load_json(body: bytes):
    """json.loads that refuses NaN/Infinity and deep nesting with RequestError(400) instead of a 500."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError(400, "malformed JSON body: nested too deep for this server") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, over-long integers
        raise RequestError(400, f"malformed JSON body: {str(exc)[:200]}") from None


def parse_retrieve(body: bytes, cfg: ServerConfig) -> RetrieveCall:
    """The request as the backend gets it, or RequestError(400 | 422) naming the field and the problem.

    Rules: `queries` a list of 1..max_queries strings, each non-blank, at most max_query_chars characters and
    valid Unicode (no lone surrogates); `topk` an integer in [1, max_topk] or null (default_topk);
    `return_scores` a boolean (default false); other fields are ignored (Search-R1 sends `topk_retrieval`)."""
    req = load_json(body)
    if not isinstance(req, dict):
        raise RequestError(422, f'body: must be a JSON object like {{"queries": ["..."]}}, got {echo(req)}')
    problems: list[str] = []
    queries = req.get("queries")
    if "queries" not in req:
        problems.append('queries: Field required; send {"queries": ["..."]}')
    elif type(queries) is not list:
        problems.append(f"queries: must be a list of strings, got {echo(queries)}")
    elif not queries:
        problems.append("queries is empty; send at least one query string")
    elif len(queries) > cfg.max_queries:  # before any per-item work
        raise RequestError(422, f"too many queries: {len(queries)} > max {cfg.max_queries}; split the request")
    topk = req.get("topk")
    if topk is None:
        topk = cfg.default_topk
    elif type(topk) is not int:
        problems.append(f"topk: must be an integer or null, got {echo(topk)}")
    elif not 1 <= topk <= cfg.max_topk:
        problems.append(f"topk must be in [1, {cfg.max_topk}], got {echo(topk)}")
    return_scores = req.get("return_scores", False)
    if type(return_scores) is not bool:
        problems.append(f"return_scores: must be true or false, got {echo(return_scores)}")
    if type(queries) is list and queries and not _items_ok(queries, cfg.max_query_chars):
        problems += _item_problems(queries, cfg.max_query_chars)
    if problems:
        more = len(problems) - MAX_FIELD_ERRORS
        raise RequestError(422, "; ".join(problems[:MAX_FIELD_ERRORS]) + (f"; and {more} more" if more > 0 else ""))
    return RetrieveCall(queries, topk, return_scores)


def _items_ok(queries: list, max_chars: int) -> bool:
    """Fast check of the common case (every item good) in a few C-level passes."""
    if not all(type(q) is str and q.strip() and len(q) <= max_chars for q in queries):
        return False
    try:
        "".join(queries).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _item_problems(queries: list, max_chars: int) -> list[str]:
    """One message per bad item (all of them: the list is already capped at max_queries)."""
    problems = []
    for i, q in enumerate(queries):
        if type(q) is not str:
            problems.append(f"queries[{i}]: must be a string, got {echo(q)}")
        elif not q.strip():
            problems.append(f"queries[{i}] is empty or whitespace; every query needs text")
        elif len(q) > max_chars:
            problems.append(f"queries[{i}] has {len(q)} characters > max {max_chars}")
        else:
            try:
                q.encode("utf-8")
            except UnicodeEncodeError as exc:
                problems.append(f"queries[{i}] is not valid Unicode: lone surrogate {q[exc.start]!r} at "
                                f"character {exc.start}")
    return problems


def parse_fast(body: bytes, cfg: ServerConfig) -> RetrieveCall | None:
    """parse_retrieve, with None instead of an error (for callers that only ask whether a body is servable)."""
    try:
        return parse_retrieve(body, cfg)
    except RequestError:
        return None


# ---------------------------------------------------------------- the contract as the OpenAPI schema shows it
class ErrorResponse(BaseModel):
    """Every error the server writes: one string naming the input and the problem."""

    detail: str


class ScoredDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    document: dict
    score: float


class RetrieveResponse(BaseModel):
    """`result[i]` is query i's hits: ScoredDocument when return_scores, else bare document rows."""

    result: list[list[ScoredDocument | dict]]


def request_schema(cfg: ServerConfig) -> dict:
    """JSON Schema of the body parse_retrieve accepts, with this server's caps (extra fields allowed)."""
    return {
        "type": "object", "required": ["queries"], "additionalProperties": True,
        "properties": {
            "queries": {"type": "array", "minItems": 1, "maxItems": cfg.max_queries,
                        "items": {"type": "string", "minLength": 1, "maxLength": cfg.max_query_chars,
                                  "pattern": r"\S"},
                        "description": "non-blank strings; lone surrogates are refused"},
            "topk": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": cfg.max_topk}, {"type": "null"}],
                     "description": f"hits per query; null or absent: {cfg.default_topk}"},
            "return_scores": {"type": "boolean", "default": False},
        },
    }
