"""`POST /retrieve` from the raw ASGI request to the reply: the one validate-and-execute path, called by the fast
lane (`fast_lane.FastLane`) and by the FastAPI route alike, so both answer every request the same way.

    status, headers, body = await handle_retrieve(scope, receive, service)

Order (cheapest refusal first; nothing past a failed step runs):
  1. bearer token (401), before a byte of the body is read
  2. content type: absent or `application/json` (any parameters), else 415
  3. Content-Length above `max_body_bytes`: 413 before the body is stored (at once when above twice the cap)
  4. read the body: 413 as soon as the bytes received pass `max_body_bytes` (chunked bodies), 408 when the whole
     body has not arrived within `body_timeout_s` (a client that announces more than it sends)
  5. `request_check.parse_retrieve` (400 malformed JSON, 422 bad fields), then `service.execute`
A refusal first drops the rest of the body (never stored; at most one more `max_body_bytes`, within the same
deadline) so a client that keeps sending still gets the reply rather than a reset; a reply that leaves any of the
body unread closes the connection, so an oversize, half-sent or unauthorised body never holds it open.
"""
from __future__ import annotations

import asyncio
import hmac

from stepsearch.search.request_check import RequestError, parse_retrieve
from stepsearch.search.service import RetrievalService, execute
from stepsearch.search.server_config import ServerConfig

JSON_HEADERS = [(b"content-type", b"application/json")]


def check_token(headers: dict[bytes, bytes], cfg: ServerConfig) -> None:
    """Bearer-token guard (constant-time compare); a no-op unless the server was started with a token."""
    if cfg.token is None:
        return
    if not hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {cfg.token}".encode()):
        raise RequestError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                           headers=[(b"www-authenticate", b"Bearer")])


def check_content_type(headers: dict[bytes, bytes]) -> None:
    """415 unless the content type is absent or application/json (`; charset=...` and other parameters allowed)."""
    ctype = headers.get(b"content-type")
    if ctype is None:
        return
    media = ctype.split(b";", 1)[0].strip().lower()
    if media != b"application/json":
        raise RequestError(415, f"content-type must be application/json, got {ctype[:60].decode('latin-1')!r}")


def declared_length(headers: dict[bytes, bytes]) -> int | None:
    """The Content-Length header, or None when absent (a chunked body). uvicorn answers a malformed one with its
    own 400 before the app runs."""
    raw = headers.get(b"content-length")
    return int(raw) if raw is not None and raw.strip().isdigit() else None


async def read_body(receive, declared: int | None, cfg: ServerConfig, deadline: float) -> bytes:
    """The whole request body, bounded in size (413) and time (408: all of it by `deadline`, the loop's clock)."""
    too_big = f"exceeds the server's max of {cfg.max_body_bytes} bytes (--max_body_bytes); split the request"
    if declared is not None and declared > cfg.max_body_bytes:
        # a client that sends the rest anyway sees a reset instead of the reply if we close on it: swallow up to
        # one more cap's worth first (never stored), then answer; beyond that, answer at once and close
        unread = await discard(receive, min(declared, 2 * cfg.max_body_bytes), deadline, declared)
        raise RequestError(413, f"request body of {declared} bytes {too_big}", close=unread)
    chunks, size, more = [], 0, True
    while more:
        message = await _receive_by(receive, deadline, declared, size, cfg)
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > cfg.max_body_bytes:
            unread = more and await discard(receive, cfg.max_body_bytes, deadline)
            raise RequestError(413, f"request body {too_big}", close=unread)
        chunks.append(chunk)
    return b"".join(chunks)


async def _receive_by(receive, deadline: float, declared: int | None, size: int, cfg: ServerConfig) -> dict:
    """The next body message, or RequestError 408 (deadline passed) / 400 (client went away)."""
    try:
        message = await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0.0))
    except asyncio.TimeoutError:
        expected = f"of {declared} " if declared is not None else ""
        raise RequestError(408, f"request body not received within {cfg.body_timeout_s}s (--body_timeout_s): "
                                f"{size} bytes {expected}arrived", close=True) from None
    if message["type"] != "http.request":  # http.disconnect: nobody is left to answer
        raise RequestError(400, "client closed the connection before the body was complete", close=True)
    return message


async def discard(receive, budget: int, deadline: float, declared: int | None = None) -> bool:
    """Read and drop the rest of a refused body, at most `budget` bytes before `deadline` (none when the
    declared length is over budget). Returns True when some of it is still unread (the reply must then close the
    connection); False when it was all drained (the connection can stay open)."""
    if declared is not None and declared > budget:
        return True
    dropped, loop = 0, asyncio.get_running_loop()
    while dropped <= budget:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:
            return True
        if message["type"] != "http.request":
            return True
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return False
    return True


async def handle_retrieve(scope, receive, service: RetrievalService) -> tuple[int, list, bytes]:
    """(status, ASGI headers, body) of the reply to one `POST /retrieve`."""
    cfg = service.cfg
    headers = dict(scope["headers"])
    deadline = asyncio.get_running_loop().time() + cfg.body_timeout_s
    try:
        declared = declared_length(headers)
        try:
            check_token(headers, cfg)
            check_content_type(headers)
        except RequestError as exc:  # refused before reading: drop the body (bounded) so the client sees the reply
            exc.close = await discard(receive, cfg.max_body_bytes, deadline, declared)
            raise
        body = await read_body(receive, declared, cfg, deadline)
        reply = await execute(service, parse_retrieve(body, cfg))
    except RequestError as exc:
        return exc.response()
    return 200, [*JSON_HEADERS, (b"content-length", str(len(reply)).encode())], reply
