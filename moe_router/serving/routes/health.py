"""GET /health and /ready (never behind the API key), and /stats."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from moe_router.serving.batcher import PassCounters
from moe_router.serving.deps import server_of
from moe_router.serving.errors import error, responses
from moe_router.serving.schemas import HealthResponse, ReadyResponse, StatsResponse

public, reads = APIRouter(), APIRouter()


@public.get("/health", response_model=HealthResponse)
async def health() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@public.get("/ready", response_model=ReadyResponse, responses=responses(503))
async def ready(request: Request) -> Any:
    """Readiness: a checkpoint is loaded and, with batching on, the batch worker runs."""
    srv = server_of(request)
    if srv.batcher is not None and not srv.batcher.running:
        return error(503, "the batch worker is not running")
    if srv.state.failed is not None:
        return error(503, srv.state.failed)
    with srv.state.lease() as snap:
        r = snap.router
        return {"status": "ready", "generation": snap.generation, "experts": r.num_experts, "vectors": r.ntotal}


@reads.get("/stats", response_model=StatsResponse)
async def stats(request: Request) -> dict:
    """Per expert: vectors, queries routed to it, load share, mean confidence; and batching counters."""
    srv = server_of(request)
    with srv.state.lease() as snap:
        experts = [vars(s) for s in snap.router.stats()]
    counters = srv.batcher.counters if srv.batcher is not None else PassCounters()
    server_stats = {
        "batching": srv.batcher is not None,
        **vars(counters),
        "mean_pass": counters.queries / max(counters.passes, 1),
        "embed_share": counters.embed_s / counters.pass_s if counters.pass_s > 0 else 0.0,
    }
    return {"generation": snap.generation, "experts": experts, "server": server_stats}
