"""The HTTP API (FastAPI): create_app puts the endpoints (serving.routes) behind the guards and error handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moe_router import __version__
from moe_router.serving.batcher import MicroBatcher
from moe_router.serving.config import AuthConfig, BatchConfig, Limits
from moe_router.serving.deps import Server
from moe_router.serving.errors import http_error, invalid_request, responses, server_error
from moe_router.serving.guards import FrontDoor, check_key
from moe_router.serving.routes import experts, health, query
from moe_router.serving.schemas import fill_served
from moe_router.serving.state import RouterState


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The micro-batcher runs while the app does; at the end (a graceful shutdown) routing counts are saved."""
    server = app.state.server
    if server.batcher is not None:
        server.batcher.start()
    try:
        yield
    finally:
        if server.batcher is not None:
            await run_in_threadpool(server.batcher.stop)
        await run_in_threadpool(server.state.flush)


def create_app(
    state: RouterState,
    batching: BatchConfig | None = None,
    limits: Limits | None = None,
    auth: AuthConfig | None = None,
) -> FastAPI:
    """The FastAPI app serving `state`; the micro-batcher runs while the app's lifespan does."""
    batching, limits, auth = batching or BatchConfig(), limits or Limits(), auth or AuthConfig()
    app = FastAPI(
        title="moe_router",
        version=__version__,
        description="Route queries to experts with a learned gate and search only the chosen experts.",
        lifespan=lifespan,
    )
    app.state.server = Server(state, MicroBatcher(state, batching) if batching.enabled else None, limits, auth)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    # Declared only where a key is set: the schema then says which operations need it, and no others.
    keyed = {"dependencies": [Depends(check_key)], "responses": responses(401)} if auth.api_key is not None else {}
    app.include_router(health.public)
    for reads in (query.reads, experts.reads, health.reads):
        app.include_router(reads, **(keyed if auth.protect_reads else {}))
    app.include_router(experts.writes, **keyed)
    routers = (health.public, query.reads, experts.reads, health.reads, experts.writes)
    app.state.api_routes = tuple(route for r in routers for route in r.routes)  # for the Allow header of a 405
    app.add_middleware(
        FrontDoor, max_bytes=limits.max_body_bytes, allowed_origins=auth.allowed_origins, routes=app.state.api_routes
    )
    app.openapi = served_openapi(app, {"dim": state.dim, **asdict(limits)})
    return app


def served_openapi(app: FastAPI, bounds: dict[str, int]) -> Callable[[], dict]:
    """app.openapi with the request models' served bounds filled in: this checkpoint's dim, this config's limits."""
    generate = app.openapi  # FastAPI builds the document once and keeps it: filled once, then found filled

    def openapi() -> dict:
        return fill_served(generate(), bounds)

    return openapi
