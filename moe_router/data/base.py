"""What training and evaluation ask of a dataset, whatever its kind: intent JSONL, BEIR folders or bare vectors.

Each kind answers in its own terms (TextDataset, BeirDataset, VectorDataset implement Dataset), so
the pipeline never asks which kind it holds. Dimension legend: n rows, d dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class StoredRows:
    """What the experts of a router built from the dataset store: texts to embed, or vectors."""

    texts: list[str] | None  # None: the rows are `vectors`
    vectors: np.ndarray | None  # (n, d) when there are no texts
    experts: list[str] | None  # the expert of each row; None: no labels (experts come from k-means)
    metadata: list[dict] | None  # stored with each row (BEIR: the document's _id and title)


@dataclass(frozen=True)
class ValidationSet:
    """The queries training validates and calibrates on."""

    queries: list[str] | np.ndarray  # texts, or (n, d) vectors
    experts: list[str] | None  # the gold expert of each query; None: no labels
    stored: bool  # the queries are stored rows: a prototype gate holds them, so it is no untrained candidate


@dataclass(frozen=True)
class TrainingDefaults:
    """The data-dependent choices behind the training config's 'auto' values."""

    monitor: str  # metric that picks the epoch: 'acc@1' (the gold expert first) | 'recall' (recall@k vs exhaustive)
    calibrate_bias: bool  # fit one logit offset per expert with the temperature (a prior correction)
    prior_weight: float  # merged hits of several experts ranked by score + w * log p(expert)


class Dataset(Protocol):
    """The questions the training pipeline and evaluation ask of any dataset."""

    name: str
    experts: list[str]  # expert names in routing order (empty when experts come from k-means)
    parents: dict[str, str | None]

    @property
    def needs_embedder(self) -> bool:
        """Whether the rows and queries are texts (else vectors)."""

    @property
    def has_judgments(self) -> bool:
        """Whether the queries come with relevance judgments of documents (evaluated with IR metrics)."""

    def stored(self) -> StoredRows:
        """The rows the experts store (split 'train')."""

    def queries(self, split: str) -> list[str] | np.ndarray:
        """What a router is asked with, for a split."""

    def gold_experts(self, split: str) -> list[str] | None:
        """The gold expert of each query of a split (in the order of queries(split)); None: no labels."""

    def oos_texts(self, split: str) -> list[str]:
        """Out-of-scope queries of a split (none for most data)."""

    def validation(self, seed: int) -> ValidationSet:
        """The validation queries; `seed` picks them when the data has to sample them."""

    def training_queries(self) -> tuple[list[str], list[str]]:
        """Real queries to train on with their gold expert (judged ones); empty when the data has none."""

    def pseudo_queries(self, view: str) -> tuple[list[str], list[str]]:
        """Query-like views of the stored rows with their expert, for cold start; empty when the data has none."""

    def defaults(self) -> TrainingDefaults:
        """The training choices this data calls for when the config says 'auto'."""
