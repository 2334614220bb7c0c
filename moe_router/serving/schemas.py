"""Request and response bodies: static models whose fields are typed strictly (no coercion: "3" is not 3).

The value rules live where their records are built: search options in SearchParams (built here, from
the fields as sent), what describes an expert in ExpertSpec (or the lifecycle call that builds one),
texts in the embedder's check, vectors in the body dependency (serving.deps) against the served
checkpoint, sizes in serving.deps.check_limits against serving.config.Limits. The schema only
describes them; bounds that belong to the served checkpoint or config are marked with `served(...)`
and filled into the app's OpenAPI document (fill_served), so a client or a fuzzer reads the real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from moe_router.checks import MAX_NAME_CHARS, MAX_SPECIALIZATION_CHARS
from moe_router.types import FIELDS, ExpertScore, Hit, SearchParams

QUERY_FIELDS = ("text", "texts", "vector", "vectors")
FLOAT32_MAX = float(np.finfo(np.float32).max)
SERVED = "x-served"


def served(**bounds: str) -> dict[str, dict[str, str]]:
    """json_schema_extra: each JSON Schema keyword's value is the served `dim` or a Limits field (fill_served)."""
    return {SERVED: bounds}


def fill_served(node: Any, bounds: Mapping[str, int]) -> Any:
    """`node` (an OpenAPI document) with every served(...) marker replaced by its value in `bounds`, in place."""
    if isinstance(node, dict):
        for keyword, bound in node.pop(SERVED, {}).items():
            node[keyword] = bounds[bound]
        for value in node.values():
            fill_served(value, bounds)
    elif isinstance(node, list):
        for value in node:
            fill_served(value, bounds)
    return node


def _schema(combinator: str | None = None, fields: tuple[str, ...] = ()) -> Callable[[dict, type], None]:
    """json_schema_extra: no null defaults on non-null fields; with `combinator`, anyOf or oneOf `fields` required."""

    def extra(schema: dict, cls: type) -> None:
        if combinator is not None:
            schema[combinator] = [{"required": [f]} for f in fields]
        for prop in schema["properties"].values():
            if "default" in prop and prop["default"] is None and "anyOf" not in prop:
                del prop["default"]

    return extra


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


Text = Annotated[str, Field(json_schema_extra={"minLength": 1, **served(maxLength="max_text_chars")})]
Number = Annotated[float, Field(json_schema_extra={"minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX})]  # float32
Vector = Annotated[list[Number], Field(json_schema_extra=served(minItems="dim", maxItems="dim"))]
Name = Annotated[str, Field(json_schema_extra={"minLength": 1, "maxLength": MAX_NAME_CHARS})]
Specialization = Annotated[str, Field(json_schema_extra={"maxLength": MAX_SPECIALIZATION_CHARS})]
# JSON Schema counts 3.0 as an integer; strict mode still rejects "3", true and 2.5.
Int = Annotated[int, BeforeValidator(_integral)]

# Search options reach SearchParams as sent (an integral float made an int, as above): it is the one
# check of their types and values, so `"per_expert": "no"` is refused with its message, never read as true.
Count = Annotated[Any, BeforeValidator(_integral), WithJsonSchema({"type": "integer", "minimum": 1})]
Flag = Annotated[Any, WithJsonSchema({"type": "boolean"})]
Mass = Annotated[
    Any, WithJsonSchema({"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1}, {"type": "null"}]})
]
Weight = Annotated[Any, WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"type": "null"}]})]


def _sizes(name: str, rows: list | None, limit: str) -> Iterator[tuple[str, int, str]]:
    """The size of a list field and, for texts, of each text."""
    if rows is None:
        return
    yield name, len(rows), limit
    for i, row in enumerate(rows):
        if isinstance(row, str):
            yield f"{name}.{i}", len(row), "max_text_chars"


class Body(BaseModel):
    """A request body: JSON types checked strictly, unknown fields refused (the values: see the module docstring)."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_schema())
    VECTORS: ClassVar[tuple[str, ...]] = ()  # fields holding vectors, checked against the served checkpoint (deps)

    def sizes(self) -> Iterator[tuple[str, int, str]]:
        """(field, size, the Limits field bounding it) for each size of the body the server limits."""
        return iter(())


class Queries(Body):
    """One query or a batch (exactly one of text, texts, vector, vectors) and the search options, as `params`."""

    model_config = ConfigDict(json_schema_extra=_schema("oneOf", QUERY_FIELDS))
    VECTORS: ClassVar[tuple[str, ...]] = ("vector", "vectors")

    # Optional fields are typed without None (`text: Text = None`): left out they default to None,
    # an explicit null is refused, and the schema does not offer null.
    text: Text = None  # one query text
    texts: Annotated[list[Text], Field(min_length=1, json_schema_extra=served(maxItems="max_queries"))] = None
    vector: Vector = None  # one query vector
    vectors: Annotated[list[Vector], Field(min_length=1, json_schema_extra=served(maxItems="max_queries"))] = None
    top_experts: Annotated[Count, Field(description="experts per query; at most the number of experts")] = 2
    top_p: Annotated[
        Mass, Field(description="adaptive expert count: the smallest set of experts whose probability reaches top_p")
    ] = None
    max_experts: Annotated[
        Count, Field(description="with top_p: the most experts per query (capped at the number of experts)")
    ] = 4
    _params: SearchParams = PrivateAttr()

    @model_validator(mode="after")
    def _checked(self) -> Queries:
        given = [f for f in QUERY_FIELDS if getattr(self, f) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "query_fields",
                "give exactly one of {fields}; got {given}",
                {"fields": ", ".join(QUERY_FIELDS), "given": ", ".join(given) or "none"},
            )
        try:
            self._params = SearchParams(**{f: getattr(self, f) for f in type(self).model_fields if f in FIELDS})
        except ValueError as exc:
            raise PydanticCustomError("search_params", "{error}", {"error": str(exc)}) from None
        return self

    @property
    def params(self) -> SearchParams:
        """The search options, checked by SearchParams when the body was parsed."""
        return self._params

    @property
    def query_texts(self) -> list[str] | None:
        return [self.text] if self.text is not None else self.texts

    def sizes(self) -> Iterator[tuple[str, int, str]]:
        if self.text is not None:
            yield "text", len(self.text), "max_text_chars"
        yield from _sizes("texts", self.texts, "max_queries")
        yield from _sizes("vectors", self.vectors, "max_queries")


class RouteRequest(Queries):
    """Queries to route: each one's experts, with the gate's probabilities."""


class SearchRequest(Queries):
    """Queries to route and search: each one's k best hits in its chosen experts."""

    k: Annotated[
        Count,
        Field(description="hits per query; at most the stored vectors", json_schema_extra=served(maximum="max_k")),
    ] = 10
    with_text: Annotated[Flag, Field(description="fetch each hit's text and metadata")] = True
    per_expert: Annotated[
        Flag, Field(description="k hits from each searched expert (grouped, most probable first), not k in all")
    ] = False
    prior_weight: Annotated[
        Weight,
        Field(description="merge by score + w * log p(expert); null = the checkpoint's (0 = by score alone)"),
    ] = None
    decide_weight: Annotated[
        Weight,
        Field(
            description="> 0: keep only the searched expert that log p(expert) + w * its best hits' mean similarity "
            "favours; null = the checkpoint's (0 = merge every searched expert's hits)"
        ),
    ] = None

    def sizes(self) -> Iterator[tuple[str, int, str]]:
        yield from super().sizes()
        yield "k", self.params.k, "max_k"


class FeedbackRequest(Body):
    model_config = ConfigDict(json_schema_extra=_schema("oneOf", ("text", "vector")))
    VECTORS: ClassVar[tuple[str, ...]] = ("vector",)

    text: Text = None  # the query, as text
    vector: Vector = None  # or as a vector
    expert: str  # the expert that served it
    positive: bool  # did this expert serve the query well

    @model_validator(mode="after")
    def _one_query(self) -> FeedbackRequest:
        if (self.text is None) == (self.vector is None):
            raise PydanticCustomError("query_fields", "give exactly one of text, vector")
        return self

    def sizes(self) -> Iterator[tuple[str, int, str]]:
        if self.text is not None:
            yield "text", len(self.text), "max_text_chars"


class AddExpertRequest(Body):
    """texts (embedded by the checkpoint's embedder) or vectors, or both (one text per vector)."""

    model_config = ConfigDict(json_schema_extra=_schema("anyOf", ("texts", "vectors")))
    VECTORS: ClassVar[tuple[str, ...]] = ("vectors",)

    name: Name
    texts: Annotated[list[Text], Field(min_length=1, json_schema_extra=served(maxItems="max_expert_vectors"))] = None
    vectors: Annotated[list[Vector], Field(min_length=1, json_schema_extra=served(maxItems="max_expert_vectors"))] = (
        None
    )
    specialization: Specialization = ""
    parent: Name | None = None
    metadata: Annotated[list[dict[str, Any]], Field(json_schema_extra=served(maxItems="max_expert_vectors"))] = None

    def sizes(self) -> Iterator[tuple[str, int, str]]:
        for name in ("texts", "vectors", "metadata"):
            yield from _sizes(name, getattr(self, name), "max_expert_vectors")


class MergeExpertsRequest(Body):
    a: Name  # the two experts to merge; the merged one takes a's place
    b: Name
    name: Name | None = None  # the merged expert's name (default "a+b"; may be a or b)
    specialization: Specialization | None = None  # default: the two's, joined when they differ


class SplitExpertRequest(Body):
    name: Name  # the expert to split by k-means over its vectors
    parts: Annotated[Int, Field(json_schema_extra={"minimum": 2})] = 2
    names: Annotated[list[Name], Field(json_schema_extra={"minItems": 2})] | None = None  # default name/0, name/1, ...


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
    texts: int  # of them, queries sent as text (embedded in their pass, one embedder call per pass)
    mean_pass: float  # queries per pass
    largest_pass: int
    pass_s: float  # seconds spent in passes
    embed_s: float  # of them, embedding texts
    search_s: float  # of them, routing and searching (the gate, FAISS, the hits' texts)
    embed_share: float  # embed_s / pass_s


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
