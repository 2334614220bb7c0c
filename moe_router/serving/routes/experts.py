"""The expert set: GET /experts, and the durable changes (POST/DELETE /experts, /merge, /split, /feedback).

Every change is saved to the checkpoint before its reply (serving.state); searches see the old or
the new expert set, never a mix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from moe_router.index.expert import Expert
from moe_router.serving.deps import json_body, server_of
from moe_router.serving.errors import responses
from moe_router.serving.schemas import (
    AddExpertRequest,
    ExpertChangeResponse,
    ExpertsChangeResponse,
    ExpertsResponse,
    FeedbackRequest,
    FeedbackResponse,
    MergeExpertsRequest,
    SplitExpertRequest,
)
from moe_router.serving.state import ExpertConflict, PersistError, UnknownExpert
from moe_router.types import ExpertSpec

reads, writes = APIRouter(), APIRouter()
FEEDBACK, ADD = json_body(FeedbackRequest), json_body(AddExpertRequest)
MERGE, SPLIT = json_body(MergeExpertsRequest), json_body(SplitExpertRequest)


def _expert(e: Expert) -> dict:
    return {"name": e.name, "specialization": e.specialization, "parent": e.parent, "vectors": e.ntotal}


async def write(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a durable write in the thread pool; its errors become 4xx/503 answers."""
    try:
        return await run_in_threadpool(fn, *args)
    except ExpertConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except UnknownExpert as exc:  # any other KeyError is a bug: a 500, not a 404
        raise HTTPException(404, str(exc.args[0])) from None
    except PersistError as exc:
        raise HTTPException(503, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


@reads.get("/experts", response_model=ExpertsResponse)
async def list_experts(request: Request) -> dict:
    with server_of(request).state.lease() as snap:
        return {"generation": snap.generation, "experts": [_expert(e) for e in snap.router.experts]}


@writes.post(
    "/feedback",
    response_model=FeedbackResponse,
    openapi_extra=FEEDBACK.openapi,
    responses=responses(400, 403, 404, 413, 415, 422, 503),
)
async def feedback(request: Request) -> dict:
    """Record whether an expert served a query well; committed to the checkpoint before the reply."""
    srv, req = server_of(request), await FEEDBACK.read(request)
    body = req.body
    query: Any = body.text if req.vectors is None else req.vectors[0]
    return {"id": await write(srv.state.record_feedback, query, body.expert, body.positive)}


@writes.post(
    "/experts",
    response_model=ExpertChangeResponse,
    status_code=201,
    openapi_extra=ADD.openapi,
    responses=responses(400, 403, 409, 413, 415, 422, 503),
)
async def add_expert(request: Request) -> dict:
    """Add an expert from vectors and/or texts; the gate grows an output for it at once.

    Saved to the checkpoint (atomically) before the reply; searches see the old or the new expert set.
    """
    srv, req = server_of(request), await ADD.read(request)
    body = req.body
    try:
        spec = ExpertSpec(body.name, body.specialization, body.parent)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    expert, generation = await write(srv.state.add_expert, spec, req.vectors, body.texts, body.metadata)
    return {"generation": generation, "expert": _expert(expert)}


@writes.post(
    "/merge",
    response_model=ExpertsChangeResponse,
    openapi_extra=MERGE.openapi,
    responses=responses(400, 403, 404, 409, 413, 415, 422, 503),
)
async def merge_experts(request: Request) -> dict:
    """Merge two experts into one (vectors, metadata and feedback combined; the gate's two rows fitted into one).

    Saved to the checkpoint before the reply. No fine-tune runs here: use scripts/experts.py for one.
    """
    srv, body = server_of(request), (await MERGE.read(request)).body
    expert, generation = await write(srv.state.merge_experts, body.a, body.b, body.name, body.specialization)
    return {"generation": generation, "experts": [_expert(expert)]}


@writes.post(
    "/split",
    response_model=ExpertsChangeResponse,
    openapi_extra=SPLIT.openapi,
    responses=responses(400, 403, 404, 409, 413, 415, 422, 503),
)
async def split_expert(request: Request) -> dict:
    """Split an expert into `parts` by k-means over its vectors (the gate's row fitted into one per part).

    Saved to the checkpoint before the reply.
    """
    srv, body = server_of(request), (await SPLIT.read(request)).body
    parts, generation = await write(srv.state.split_expert, body.name, body.parts, body.names)
    return {"generation": generation, "experts": [_expert(e) for e in parts]}


@writes.delete(
    "/experts/{name:path}", response_model=ExpertChangeResponse, responses=responses(403, 404, 409, 422, 503)
)
async def remove_expert(name: str, request: Request) -> dict:
    """Remove an expert (its index, gate output and metadata); saved to the checkpoint before the reply."""
    return {"generation": await write(server_of(request).state.remove_expert, name), "expert": None}
