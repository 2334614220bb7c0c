"""Experts created from a corpus: one per category, or n by size-capped k-means."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_router.checks import check_new_name
from moe_router.gate.surgery import refit_rows
from moe_router.index.clustering import balanced_kmeans
from moe_router.routing.parts import Change, RouterParts
from moe_router.routing.router import Router


@dataclass(frozen=True)
class AutoCreateReport:
    created: list[tuple[str, int]]  # (expert, vectors)
    skipped: list[tuple[str, int]]  # (category, documents) below the minimum


def _add_all(
    router: Router,
    groups: list[tuple[str, np.ndarray, str]],
    xb: np.ndarray,
    texts: Sequence[str] | None,
    metadata: Sequence[dict] | None,
    parent: str | None,
    fit_rows: bool,
) -> list[tuple[str, int]]:
    """Add one expert per (name, rows, specialization), then fit their gate rows; on any failure remove them again."""
    added: list[str] = []
    try:
        for name, rows, spec in groups:
            router.add_expert(
                name,
                xb[rows],
                texts=[texts[r] for r in rows] if texts is not None else None,
                specialization=spec,
                parent=parent,
                metadata=[metadata[r] for r in rows] if metadata is not None else None,
                fit_row=False,  # all new rows are fitted together below
            )
            added.append(name)
        if fit_rows and added and router.gate is not None and router.num_experts > len(added):

            def refit(parts: RouterParts) -> Change:
                idx = [parts.position(n) for n in added]
                return Change(parts.replace(gate=refit_rows(parts.gate, parts.experts, idx)))

            router.update(refit)
    except BaseException:
        for name in reversed(added):
            router.remove_expert(name)
        raise
    return [(name, len(rows)) for name, rows, _ in groups]


def slug(text: str) -> str:
    return "_".join(text.lower().split())


def auto_create_by_category(
    router: Router,
    categories: Sequence[str],
    texts: Sequence[str] | None = None,
    vectors: Any = None,
    min_docs: int = 5,
    name_format: str = "{category}",
    parent: str | None = None,
    metadata: Sequence[dict] | None = None,
    fit_rows: bool = True,
) -> AutoCreateReport:
    """One expert per category with at least `min_docs` documents (the others are skipped and reported).

    The expert is named name_format.format(category=...) and specialised as the category's slug.
    With a gate, the new rows are fitted together (gate.surgery.refit_rows; `fit_rows`). All names are checked
    before anything is added; a failure part-way removes what was added.
    """
    xb = router.prepare_rows(texts, vectors, "auto-create by category")
    if len(categories) != xb.shape[0]:
        raise ValueError(f"auto-create by category: {xb.shape[0]} documents but {len(categories)} categories")
    if metadata is not None and len(metadata) != xb.shape[0]:
        raise ValueError(f"auto-create by category: {len(metadata)} metadata entries for {xb.shape[0]} documents")
    cats = np.array([str(c) for c in categories])
    groups, skipped = [], []
    taken = set(router.expert_names)
    for cat in dict.fromkeys(cats.tolist()):  # first-seen order
        rows = np.flatnonzero(cats == cat)
        if len(rows) < min_docs:
            skipped.append((cat, len(rows)))
            continue
        name = check_new_name(name_format.format(category=cat), taken, f"auto-create for category {cat!r}")
        taken.add(name)
        groups.append((name, rows, slug(cat)))
    return AutoCreateReport(_add_all(router, groups, xb, texts, metadata, parent, fit_rows), skipped)


def auto_create_by_clustering(
    router: Router,
    n: int,
    texts: Sequence[str] | None = None,
    vectors: Any = None,
    max_imbalance: float = 1.5,
    seed: int = 0,
    prefix: str = "cluster",
    parent: str | None = None,
    metadata: Sequence[dict] | None = None,
    fit_rows: bool = True,
) -> AutoCreateReport:
    """`n` experts from unlabelled documents by FAISS k-means, no expert above max_imbalance x the mean size."""
    xb = router.prepare_rows(texts, vectors, "auto-create by clustering")
    if metadata is not None and len(metadata) != xb.shape[0]:
        raise ValueError(f"auto-create by clustering: {len(metadata)} metadata entries for {xb.shape[0]} documents")
    labels = balanced_kmeans(xb, n, metric=router.metric, seed=seed, max_imbalance=max_imbalance)
    taken = set(router.expert_names)
    groups = []
    for j in range(n):
        name = check_new_name(f"{prefix}{j}", taken, "auto-create by clustering")
        groups.append((name, np.flatnonzero(labels == j), name))
    return AutoCreateReport(_add_all(router, groups, xb, texts, metadata, parent, fit_rows), [])


def auto_create_experts(
    router: Router,
    texts: Sequence[str] | None = None,
    vectors: Any = None,
    categories: Sequence[str] | None = None,
    n: int | None = None,
    min_docs: int = 5,
    max_imbalance: float = 1.5,
    seed: int = 0,
    **kwargs: Any,
) -> AutoCreateReport:
    """Experts from a corpus: one per category (>= min_docs documents), or `n` by balanced k-means."""
    if (categories is None) == (n is None):
        raise ValueError("auto_create_experts: give either categories (one per document) or n (clusters), not both")
    if categories is not None:
        return auto_create_by_category(router, categories, texts, vectors, min_docs=min_docs, **kwargs)
    return auto_create_by_clustering(router, n, texts, vectors, max_imbalance=max_imbalance, seed=seed, **kwargs)
