"""IR metrics against relevance judgments (plain numpy): nDCG@k, recall@k, MRR@k.

A run maps a query id to its ranked document ids (best first); qrels map a query id to
{document id: graded relevance}, relevance > 0 = relevant (the BEIR / trec_eval convention).
Every metric is the mean over the judged queries that have at least one relevant document;
a judged query missing from the run scores 0. nDCG uses linear gains (the relevance grade)
and the log2(rank + 1) discount, as trec_eval's ndcg_cut and ranx's ndcg do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Run = Mapping[str, Sequence[str]]
Qrels = Mapping[str, Mapping[str, float]]


def _judged(qrels: Qrels) -> list[str]:
    """The query ids with at least one relevant document, in qrels order."""
    return [q for q, docs in qrels.items() if any(float(s) > 0 for s in docs.values())]


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check(run: Run, qrels: Qrels) -> list[str]:
    """The judged queries; a clear error when there are none or the run is not ranked lists."""
    judged = _judged(qrels)
    if not judged:
        raise ValueError("qrels has no query with a relevant document (score > 0); nothing to evaluate")
    for q, docs in run.items():
        if isinstance(docs, (str, bytes)) or isinstance(docs, Mapping):
            raise ValueError(f"run[{q!r}] must be a ranked sequence of document ids, got {type(docs).__name__}")
    return judged


def _dedup(docs: Sequence[str], k: int) -> list[str]:
    """The first k distinct ids of a ranking (a repeated id counts once, at its best rank)."""
    seen: dict[str, None] = {}
    for d in docs:
        if d not in seen:
            seen[d] = None
            if len(seen) == k:
                break
    return list(seen)


def ndcg_per_query(run: Run, qrels: Qrels, k: int = 10) -> dict[str, float]:
    """nDCG@k of each judged query: DCG of the run's top k over DCG of the ideal order of its qrels."""
    k = _check_k(k)
    out = {}
    for q in _check(run, qrels):
        rel = {d: float(s) for d, s in qrels[q].items() if float(s) > 0}
        gains = np.array([rel.get(d, 0.0) for d in _dedup(run.get(q, ()), k)])
        discount = 1.0 / np.log2(np.arange(2, k + 2))  # rank r (1-based) -> 1 / log2(r + 1)
        ideal = np.sort(np.fromiter(rel.values(), dtype=np.float64))[::-1][:k]
        out[q] = float((gains * discount[: len(gains)]).sum() / (ideal * discount[: len(ideal)]).sum())
    return out


def recall_per_query(run: Run, qrels: Qrels, k: int = 10) -> dict[str, float]:
    """recall@k of each judged query: share of its relevant documents inside the run's top k."""
    k = _check_k(k)
    out = {}
    for q in _check(run, qrels):
        rel = {d for d, s in qrels[q].items() if float(s) > 0}
        out[q] = len(rel.intersection(_dedup(run.get(q, ()), k))) / len(rel)
    return out


def mrr_per_query(run: Run, qrels: Qrels, k: int = 10) -> dict[str, float]:
    """Reciprocal rank of the first relevant document within the top k (0 when none is there)."""
    k = _check_k(k)
    out = {}
    for q in _check(run, qrels):
        rel = {d for d, s in qrels[q].items() if float(s) > 0}
        out[q] = next((1.0 / r for r, d in enumerate(_dedup(run.get(q, ()), k), 1) if d in rel), 0.0)
    return out


def ndcg_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """Mean nDCG@k over the judged queries."""
    return float(np.mean(list(ndcg_per_query(run, qrels, k).values())))


def recall_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """Mean recall@k against the judgments over the judged queries."""
    return float(np.mean(list(recall_per_query(run, qrels, k).values())))


def mrr_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """Mean reciprocal rank of the first relevant document within the top k."""
    return float(np.mean(list(mrr_per_query(run, qrels, k).values())))


def ir_metrics(run: Run, qrels: Qrels) -> dict[str, float]:
    """The retrieval report's four metrics: ndcg@10, recall@10, recall@100, mrr@10."""
    return {
        "ndcg@10": ndcg_at_k(run, qrels, 10),
        "recall@10": recall_at_k(run, qrels, 10),
        "recall@100": recall_at_k(run, qrels, 100),
        "mrr@10": mrr_at_k(run, qrels, 10),
    }
