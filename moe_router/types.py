"""The library's records: what a search is asked (SearchParams), what describes an expert (ExpertSpec),
and what comes back (routing choices, hits, array results, per-expert stats, feedback rows).

A record that comes from outside is checked once, when it is built (moe_router.checks); layers pass
the checked record on instead of re-validating its fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_router import checks


@dataclass(frozen=True)
class SearchParams:
    """How a batch of queries is routed and searched. Checked when built: a wrong type or range is a ValueError.

    What depends on the router (k at most its vectors, top_experts at most its experts) is checked
    by Router.check_params when the router uses the record.
    """

    k: int = 10  # hits per query (per searched expert with per_expert)
    top_experts: int = 2  # experts searched per query; unused with top_p
    top_p: float | None = None  # adaptive: the fewest experts whose calibrated probability reaches this mass
    max_experts: int = 4  # with top_p: the most experts per query (capped at the number of experts)
    per_expert: bool = False  # k hits from each searched expert, most probable expert first (routeQuery)
    with_text: bool = True  # fetch each hit's stored text and metadata
    prior_weight: float | None = None  # merge by score + w * log p(expert); None: the router's own
    abstain: bool = False  # no experts and no hits for queries under the calibrated in-scope threshold
    decide_weight: float | None = None  # > 0: a merged search keeps one expert, re-decided from hits; None: router's

    def __post_init__(self) -> None:
        for name in ("k", "top_experts", "max_experts"):
            object.__setattr__(self, name, checks.check_count(getattr(self, name), name))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", checks.check_probability_mass(self.top_p, "top_p"))
        for name in ("per_expert", "with_text", "abstain"):
            object.__setattr__(self, name, checks.check_bool(getattr(self, name), name))
        if self.prior_weight is not None:
            object.__setattr__(self, "prior_weight", checks.check_prior_weight(self.prior_weight))
        if self.decide_weight is not None:
            object.__setattr__(self, "decide_weight", checks.check_decide_weight(self.decide_weight))

    @classmethod
    def of(cls, params: SearchParams | None = None, **options: Any) -> SearchParams:
        """`params` with `options` replacing its fields (or the defaults with `options`); unknown names refused."""
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown search option {unknown[0]!r}; expected some of {list(FIELDS)}")
        if params is None:
            return cls(**options)
        if not isinstance(params, SearchParams):
            raise ValueError(f"params must be a SearchParams, got {type(params).__name__}")
        return dataclasses.replace(params, **options) if options else params

    @property
    def adaptive(self) -> bool:
        return self.top_p is not None


FIELDS = tuple(f.name for f in dataclasses.fields(SearchParams))


@dataclass(frozen=True)
class ExpertSpec:
    """What describes an expert: its name, its specialization (default: the name) and its parent group.

    Checked when built (checks.check_name and friends), wherever an expert enters: add_expert, merge,
    split, a parent change, the HTTP API and a checkpoint being read.
    """

    name: str
    specialization: str = ""
    parent: str | None = None

    def __post_init__(self) -> None:
        checks.check_name(self.name)
        spec = checks.check_specialization(self.specialization, f"specialization of expert {self.name!r}")
        object.__setattr__(self, "specialization", spec or self.name)
        checks.check_parent(self.parent, self.name, f"parent of expert {self.name!r}")

    def with_parent(self, parent: str | None) -> ExpertSpec:
        return dataclasses.replace(self, parent=parent)

    def as_dict(self) -> Mapping[str, Any]:
        return {"name": self.name, "specialization": self.specialization, "parent": self.parent}


@dataclass(frozen=True)
class ExpertScore:
    """One expert chosen for a query."""

    expert: str
    probability: float  # gate softmax probability over all experts: the routing confidence
    weight: float  # probability renormalised over the experts chosen for this query
    specialization: str = ""
    parent: str | None = None


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int
    score: float  # inner product (metric 'ip', higher is closer) or squared L2 distance ('l2', lower is closer)
    expert: str
    specialization: str
    parent: str | None
    routing_score: float  # the gate's probability for this hit's expert
    text: str | None = None
    metadata: dict = field(default_factory=dict)


class SearchHits(list):
    """One query's hits (a plain list of Hit, best first) and the chosen experts that did not answer.

    `missing_experts` is empty unless an expert could not be reached (an expert actor of the Ray
    backend that died or ran past its timeout): the hits are then the other chosen experts' only,
    and the caller can tell a short answer from a complete one. Slicing keeps it.
    """

    def __init__(self, hits: Iterable[Hit] = (), missing_experts: Sequence[str] = ()) -> None:
        super().__init__(hits)
        self.missing_experts: tuple[str, ...] = tuple(missing_experts)

    def __getitem__(self, item):  # type: ignore[override]
        got = super().__getitem__(item)
        return SearchHits(got, self.missing_experts) if isinstance(item, slice) else got

    def __repr__(self) -> str:
        return f"SearchHits({list.__repr__(self)}, missing_experts={self.missing_experts!r})"


@dataclass(frozen=True)
class RoutedSearch:
    """Array form of a routed search; -1 in I and E where fewer than k vectors were reachable."""

    D: np.ndarray  # (nq, k) scores, best first
    I: np.ndarray  # (nq, k) global ids
    E: np.ndarray  # (nq, k) index of the expert holding each hit
    scanned: np.ndarray  # (nq,) vectors compared per query
    # (nq, t) index of each chosen expert that did not answer (its hits are absent), -1 where it
    # did; None when every chosen expert answered. Only a remote backend leaves experts out.
    missing: np.ndarray | None = None

    def missing_of(self, q: int) -> list[int]:
        """Indices of the experts chosen for query q that did not answer."""
        return [] if self.missing is None else [int(e) for e in self.missing[q] if e >= 0]


@dataclass(frozen=True)
class ExpertStats:
    name: str
    specialization: str
    parent: str | None
    vectors: int
    queries: int  # queries routed to this expert (among each query's chosen experts)
    load_share: float  # share of all (query, expert) assignments
    mean_confidence: float  # mean gate probability when chosen (0.0 if never chosen)


@dataclass(frozen=True)
class FeedbackRecord:
    """One feedback row: whether `expert` served `query` well."""

    seq: int  # the record's id (insertion order)
    query: str | None  # the query text, when it was a text
    vector: np.ndarray  # (d,) the prepared query vector
    expert: str
    positive: bool
    created: float  # unix time
