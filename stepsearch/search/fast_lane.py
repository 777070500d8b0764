"""Fast lane: `FastLane` wraps the FastAPI app as a plain ASGI callable and answers every `POST /retrieve` itself,
through the same `retrieve_handler.handle_retrieve` the FastAPI route calls, without FastAPI's per-request
machinery (routing, dependency injection, response classes). A cache hit never leaves the event loop and is
spliced from its stored JSON. Every other request (other routes and methods, the lifespan) goes to FastAPI.
`--no_fast_lane` serves everything through FastAPI; the replies are the same either way.
"""
from __future__ import annotations

from fastapi import FastAPI

from stepsearch.search.retrieve_handler import handle_retrieve


class FastLane:
    """ASGI app: `POST /retrieve` via handle_retrieve, the rest via `app`."""

    def __init__(self, app: FastAPI):
        self.app = app  # the app's service (app.state.service) carries the config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/retrieve" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        status, headers, body = await handle_retrieve(scope, receive, self.app.state.service)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
