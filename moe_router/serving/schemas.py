"""Request and response bodies. Built per server, so the OpenAPI schema states this checkpoint's
vector dimension and this config's limits (a client or a fuzzer reads the real bounds)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)

from moe_router.serving.config import Limits
from moe_router.types import ExpertScore, Hit

QUERY_FIELDS = ("text", "texts", "vector", "vectors")
FLOAT32_MAX = 3.4028234663852886e38


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx body."""

    error: str  # what went wrong, in a sentence
    detail: list[dict[str, Any]] | None = None  # per-field problems for a 422 (loc, msg, type)


class RouteResult(BaseModel):
    experts: list[ExpertScore]  # best first (the library's own record: one definition of its fields)


class RouteResponse(BaseModel):
    generation: int  # expert-set version that answered (bumped by every add/remove)
    results: list[RouteResult]  # one per query, in order


class SearchResult(BaseModel):
    hits: list[Hit]  # best first, at most k (the library's own record)
    # Chosen experts that did not answer (an expert actor of the Ray backend that is down or too
    # slow): the hits are then the other chosen experts' only. Empty when the answer is complete.
    missing_experts: list[str] = []


class SearchResponse(BaseModel):
    generation: int
    results: list[SearchResult]  # one per query, in order


class ExpertOut(BaseModel):
    name: str
    specialization: str
    parent: str | None
    vectors: int


class ExpertsResponse(BaseModel):
    generation: int
    experts: list[ExpertOut]


class ExpertChangeResponse(BaseModel):
    generation: int  # the expert set's new version, already saved to the checkpoint
    expert: ExpertOut | None = None  # the expert added (None for a removal)


class ExpertsChangeResponse(BaseModel):
    generation: int  # the expert set's new version, already saved to the checkpoint
    experts: list[ExpertOut]  # the experts the change made (the merged one, or the parts of a split)


class ExpertStatsOut(BaseModel):
    name: str
    specialization: str
    parent: str | None
    vectors: int
    queries: int  # queries routed to it since the checkpoint's stats began
    load_share: float
    mean_confidence: float


class ServerStatsOut(BaseModel):
    batching: bool
    passes: int  # micro-batch passes run
    queries: int  # queries answered through passes
    mean_pass: float  # queries per pass
    largest_pass: int


class StatsResponse(BaseModel):
    generation: int
    experts: list[ExpertStatsOut]
    server: ServerStatsOut


class FeedbackResponse(BaseModel):
    id: int  # the feedback row, committed to the checkpoint's store before this reply


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    status: str
    generation: int
    experts: int
    vectors: int


def _exactly_one(body: BaseModel, fields: tuple[str, ...]) -> None:
    given = [f for f in fields if getattr(body, f) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(fields)}; got {', '.join(given) or 'none'}")


def _schema(combinator: str, fields: tuple[str, ...]):
    """json_schema_extra: at least one (anyOf) or exactly one (oneOf) of `fields`; no null defaults on non-null fields."""

    def extra(schema: dict, cls: type) -> None:
        schema[combinator] = [{"required": [f]} for f in fields]
        for prop in schema["properties"].values():
            if "default" in prop and prop["default"] is None and "anyOf" not in prop:
                del prop["default"]

    return extra


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


# JSON Schema counts 3.0 as an integer; strict mode still rejects "3", true and 2.5.
Int = Annotated[int, BeforeValidator(_integral)]


def build_models(dim: int, limits: Limits, nonzero: bool = True) -> SimpleNamespace:
    """Request models for vectors of `dim` and the bounds in `limits`; `nonzero` for metric ip.

    Optional query fields are typed without None (`text: Text = None`): left out they default
    to None, but an explicit null is rejected, and the schema does not offer null.
    """
    Text = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_text_chars, pattern=r"\S")]
    Number = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]  # vectors are float32
    Vector = Annotated[list[Number], Field(min_length=dim, max_length=dim)]
    if nonzero:  # metric ip normalises every vector: the zero vector has no direction
        Vector = Annotated[
            Vector, WithJsonSchema({**TypeAdapter(Vector).json_schema(), "not": {"items": {"const": 0}}})
        ]
    Texts = Annotated[list[Text], Field(min_length=1, max_length=limits.max_queries)]
    Vectors = Annotated[list[Vector], Field(min_length=1, max_length=limits.max_queries)]
    TopExperts = Annotated[Int, Field(ge=1, le=1024, description="experts per query; at most the number of experts")]
    TopP = Annotated[
        float,
        Field(
            gt=0.0,
            le=1.0,
            allow_inf_nan=False,
            description="adaptive expert count: the smallest set of experts whose probability reaches top_p",
        ),
    ]
    PriorWeight = Annotated[
        float,
        Field(
            ge=0.0, le=100.0, allow_inf_nan=False, description="weight of the log gate probability when merging hits"
        ),
    ]
    MaxExperts = Annotated[
        Int,
        Field(ge=1, le=1024, description="with top_p: the most experts per query (capped at the number of experts)"),
    ]

    class Queries(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_schema("oneOf", QUERY_FIELDS))

        text: Text = None  # one query text
        texts: Texts = None  # a batch of query texts
        vector: Vector = None  # one query vector
        vectors: Vectors = None  # a batch of query vectors

        @model_validator(mode="after")
        def _one_query_field(self) -> Queries:
            _exactly_one(self, QUERY_FIELDS)
            return self

    class RouteRequest(Queries):
        top_experts: TopExperts = 2
        top_p: TopP = None  # set: adaptive expert count instead of top_experts
        max_experts: MaxExperts = 4  # with top_p only

    class SearchRequest(Queries):
        k: Annotated[Int, Field(ge=1, le=limits.max_k, description="hits per query; at most the stored vectors")] = 10
        top_experts: TopExperts = 2
        top_p: TopP = None  # set: adaptive expert count instead of top_experts
        max_experts: MaxExperts = 4  # with top_p only
        with_text: bool = True  # fetch each hit's text and metadata
        per_expert: bool = False  # k hits from each searched expert (grouped, most probable first), not k in all
        prior_weight: PriorWeight = None  # merge by score + w * log p(expert); None = the checkpoint's (0 = by score)

    class FeedbackRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_schema("oneOf", ("text", "vector")))

        text: Text = None  # the query, as text
        vector: Vector = None  # or as a vector
        expert: Annotated[str, StringConstraints(min_length=1, max_length=256)]
        positive: bool  # did this expert serve the query well

        @model_validator(mode="after")
        def _one_query(self) -> FeedbackRequest:
            _exactly_one(self, ("text", "vector"))
            return self

    ExpertName = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^\S(.*\S)?$")]
    Specialization = Annotated[str, StringConstraints(max_length=1024)]

    class AddExpertRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_schema("anyOf", ("texts", "vectors")))

        name: ExpertName
        texts: Annotated[list[Text], Field(min_length=1, max_length=limits.max_expert_vectors)] = None
        vectors: Annotated[list[Vector], Field(min_length=1, max_length=limits.max_expert_vectors)] = None
        specialization: Specialization = ""
        parent: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
        metadata: Annotated[list[dict[str, Any]], Field(max_length=limits.max_expert_vectors)] = None

        @model_validator(mode="after")
        def _has_vectors(self) -> AddExpertRequest:
            if self.texts is None and self.vectors is None:
                raise ValueError("give texts (embedded by the checkpoint's embedder) or vectors, or both")
            return self

    class MergeExpertsRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")

        a: ExpertName  # the two experts to merge; the merged one takes a's place
        b: ExpertName
        name: ExpertName | None = None  # the merged expert's name (default "a+b"; may be a or b)
        specialization: Specialization | None = None  # default: the two's, joined when they differ

    class SplitExpertRequest(BaseModel):
        model_config = ConfigDict(strict=True, extra="forbid")

        name: ExpertName  # the expert to split by k-means over its vectors
        parts: Annotated[Int, Field(ge=2, le=64)] = 2
        names: Annotated[list[ExpertName], Field(min_length=2, max_length=64)] | None = (
            None  # default name/0, name/1, ...
        )

    return SimpleNamespace(
        RouteRequest=RouteRequest,
        SearchRequest=SearchRequest,
        FeedbackRequest=FeedbackRequest,
        AddExpertRequest=AddExpertRequest,
        MergeExpertsRequest=MergeExpertsRequest,
        SplitExpertRequest=SplitExpertRequest,
    )
