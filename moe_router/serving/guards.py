"""Who may drive the server: the front door (browser guard, body size limit) and the API key."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match

from moe_router.serving.config import normalise_origin
from moe_router.serving.deps import server_of
from moe_router.serving.errors import error

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # a page cannot read their answers without CORS headers (never sent)


class FrontDoor:
    """ASGI middleware, every request's first checks: what a web page of another site could send
    (browser_refusal: 403 or 415) to one of `routes` with a method it has, then a body over
    `max_bytes` (413), before any of it is parsed.

    uvicorn has no body limit of its own; this reads the body (bounded) and replays it. A middleware
    rather than FastAPI dependencies: it costs no dependency solving per request. A method or path
    the API does not have is left to routing (405 or 404), as it was when the guard was a dependency.
    """

    def __init__(
        self, app: Any, max_bytes: int, allowed_origins: tuple[str, ...], routes: tuple[BaseRoute, ...]
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.allowed_origins = allowed_origins
        self.routes = routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] not in SAFE_METHODS and any(r.matches(scope)[0] is Match.FULL for r in self.routes):
            refusal = browser_refusal(scope["method"], Headers(scope=scope), self.allowed_origins)
            if refusal is not None:
                return await error(refusal.status_code, refusal.detail)(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as a real receive would

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        await error(413, f"request body over {self.max_bytes} bytes (limits.max_body_bytes)")(scope, receive, send)


def _foreign(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a browser's Origin is neither the server's own (its Host header) nor in `allowed`."""
    try:
        origin = normalise_origin(origin)
    except ValueError:
        return True  # not an origin a browser would send
    if origin in allowed:
        return False
    # Same origin: the page was served by this server (e.g. /docs); the scheme may differ behind a TLS proxy.
    return origin == "null" or host is None or origin.split("://", 1)[1] != host.strip().lower()


def browser_refusal(method: str, headers: Headers, allowed: tuple[str, ...]) -> HTTPException | None:
    """The 403 or 415 for what a web page of another site could send without a CORS preflight, else None.

    A browser sends a cross-site POST with Content-Type text/plain (or a form type) without asking
    first, so parsing such a body as JSON would let any page the operator opens drive the server.
    Every POST must say `application/json` (415 otherwise; JSON is UTF-8, so only that charset), and
    a POST or DELETE carrying an Origin other than the server's own or one of `allowed` gets 403.
    Requests without an Origin (curl, SDKs, other servers) are not browsers' and pass.
    """
    if method in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if origin is not None and _foreign(origin, headers.get("host"), allowed):
        return HTTPException(
            403,
            f"cross-origin request from {origin[:200]!r} refused: only the server's own "
            "origin and auth.allowed_origins may send POST or DELETE",
        )
    if method == "POST":
        got = headers.get("content-type")
        media, _, params = (got or "").partition(";")
        charset = dict(p.strip().lower().partition("=")[::2] for p in params.split(";") if "=" in p).get("charset")
        if media.strip().lower() != "application/json" or charset not in (None, "utf-8", '"utf-8"'):
            shown = repr(got[:200]) if got is not None else "none"
            return HTTPException(
                415, f"the request body must be JSON: send Content-Type: application/json (got {shown})"
            )
    return None


KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the key set in auth.api_key")


async def check_key(request: Request, key: str | None = Security(KEY_HEADER)) -> None:
    """401 unless the request carries auth.api_key (create_app adds this only to servers with a key)."""
    if key is None or not secrets.compare_digest(key.encode(), str(server_of(request).auth.api_key).encode()):
        raise HTTPException(401, "missing or wrong API key (send it in the X-API-Key header)")
