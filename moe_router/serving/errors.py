"""Errors as JSON: every client mistake is a 4xx with an ErrorResponse body; a 500 means a bug in the server."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from moe_router.serving.schemas import ErrorResponse

log = logging.getLogger(__name__)


def error(status: int, message: str, detail: list[dict] | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, detail=detail).model_dump(), status_code=status, headers=headers)


def responses(*codes: int) -> dict[int, dict]:
    """The OpenAPI `responses` entry of the error codes an endpoint answers."""
    return {code: {"model": ErrorResponse} for code in codes}


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 for a body that is not JSON, else 422 naming the first field in error (a body-wide rule names none)."""
    errors = exc.errors()
    detail = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors[:20]
    ]
    if any(e.get("type") == "json_invalid" for e in errors):
        return error(400, "the request body is not valid JSON", detail)
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body")
    return error(422, f"{where}: {first['msg']}" if where else first["msg"], detail)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:  # Starlette names only the first matching route's methods; name them all
        routes = request.app.state.api_routes
        allowed = {m for r in routes if r.matches(request.scope)[0] != Match.NONE for m in r.methods}
        headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
    return error(exc.status_code, str(exc.detail), headers=headers)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error(500, "internal server error")
