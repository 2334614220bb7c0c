"""Retrieval evaluation against relevance judgments: routed, adaptive, exhaustive and oracle-source search.

For a split of a BEIR dataset: nDCG@10, recall@10, recall@100 and MRR@10 of the gate at 1 and 2
sources and with top-p routing, of every baseline at the same settings, of exhaustive search over
every source (one flat index, the reference) and of the oracle source (only the gold source is
searched); source acc@1, the share of relevant documents inside the searched sources, mean sources
searched; and the frontier of nDCG@10 against mean sources searched (top-k 1..4, a grid of p).
Dimension legend: n queries, E sources (experts), k hits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moe_router.data.beir import BeirDataset
from moe_router.eval.adaptive import (
    P_GRID,
    TOP_K,
    FrontierPoint,
    Selection,
    baseline_probs,
    check_top_p,
    fixed_selection,
    frontier,
    p_at_cost,
    prefix_search,
    top_k_selection,
    top_p_selection,
)
from moe_router.eval.baselines import BASELINES, GATE, LogisticRegressionRouter, RagRouteStyle
from moe_router.eval.calibration import calibrated_with_bias, calibration_report
from moe_router.eval.ir import ir_metrics
from moe_router.index.exact import exhaustive_index, stacked
from moe_router.metrics import accuracy_at_k, expected_calibration_error
from moe_router.routing.router import Router
from moe_router.types import SearchParams

DEPTH = 100  # hits kept per query: recall@100 needs the top 100

EXHAUSTIVE = "exhaustive (every source, one flat index)"

ORACLE = "oracle source (only the gold source)"


class DocLookup:
    """Global row id -> the document's `_id` (stored metadata) and the index of the source holding it."""

    def __init__(self, router: Router) -> None:
        _, ids, owner = stacked(router.experts)
        meta = router.lookup(ids.tolist())
        missing = [int(i) for i in ids if "_id" not in meta.get(int(i), (None, {}))[1]]
        if missing:
            raise ValueError(
                f"{len(missing)} stored rows (e.g. id {missing[0]}) have no metadata '_id': this checkpoint "
                "was not built from BEIR data (train it with data=beir)"
            )
        self.doc = {int(i): str(meta[int(i)][1]["_id"]) for i in ids}
        self.source = {self.doc[int(i)]: int(o) for i, o in zip(ids, owner)}
        self.num_experts = router.num_experts

    def run(self, qids: Sequence[str], rows: np.ndarray) -> dict[str, list[str]]:
        """{query id: ranked doc _ids} from (n, k) global ids (-1 = no hit)."""
        return {q: [self.doc[int(i)] for i in r if i >= 0] for q, r in zip(qids, rows)}


def relevant_share(sel: Selection, qids: Sequence[str], qrels: dict[str, dict[str, int]], lookup: DocLookup) -> float:
    """Mean over queries of the share of its relevant documents that lie in the sources it searches."""
    mask = sel.mask(lookup.num_experts)  # (n, E)
    shares = []
    for q, qid in enumerate(qids):
        src = [lookup.source[d] for d, s in qrels[qid].items() if s > 0]
        shares.append(float(mask[q, src].mean()))
    return float(np.mean(shares))


def gold_sources(router: Router, dataset: BeirDataset, split: str) -> np.ndarray:
    """(n,) index into router.experts of the source holding each judged query's relevant documents (-1 = none)."""
    index = {name: i for i, name in enumerate(router.expert_names)}
    return np.array([index.get(s, -1) for s in dataset.gold_sources(split)], dtype=np.int64)


def labelled_queries(router: Router, dataset: BeirDataset, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(x (m, d), gold (m,)) of a split's judged queries, or None when the split has none."""
    if split == "test" or not dataset.has_split(split) or not dataset.query_ids(split):
        return None  # test queries never train or calibrate anything
    return router.prepare(dataset.queries(split))[0], gold_sources(router, dataset, split)


def build_baselines(router: Router, dataset: BeirDataset, names: Sequence[str], seed: int = 0) -> list[Any]:
    """Each named baseline; RAGRoute style learns from the train split's judged queries, else the documents;
    the logistic regression from both, as the gate does, calibrated on the gate's validation judgments."""
    unknown = [key for key in names if key not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; expected some of {sorted(BASELINES)}")
    train = labelled_queries(router, dataset, "train")
    out = []
    for key in names:
        if key == "ragroute" and train is not None:
            out.append(RagRouteStyle(router, *train, seed=seed))
        elif key == "logreg":
            out.append(
                LogisticRegressionRouter(
                    router,
                    *(train or (None, None)),
                    calib=labelled_queries(router, dataset, "val"),
                    bias=calibrated_with_bias(router, dataset),
                    query_weight=float(router.config.get("targets", {}).get("query_weight", 0.5)),
                    seed=seed,
                )
            )
        else:
            out.append(BASELINES[key](router))
    return out


def evaluate_retrieval(
    router: Router,
    dataset: BeirDataset,
    split: str = "test",
    top_p: float = 0.9,
    max_experts: int = 4,
    p_grid: Sequence[float] = P_GRID,
    top_k: Sequence[int] = TOP_K,
    baselines: Sequence[str] = tuple(BASELINES),
    seed: int = 0,
    checkpoint: str = "",
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluate `router` on `dataset`'s judged `split` against exhaustive search, the oracle source and the baselines.

    Returns (report, each router's scores (n, E)). The report's top-level keys are the gate's and
    the references' (source_acc@1, ndcg@10@1, ndcg@10@2, ndcg@10@adaptive, sources@adaptive,
    ndcg@10@exhaustive, ndcg@10@oracle, ...); `routers` holds every router's rows, `frontier` its curve.
    """
    check_top_p(top_p, p_grid)
    max_experts = min(SearchParams(max_experts=max_experts).max_experts, router.num_experts)  # 4 of 3 sources = all 3
    qids, qrels = dataset.query_ids(split), dataset.qrels(split)
    if not qids:
        raise ValueError(f"dataset {dataset.name!r} has no judged {split!r} queries (qrels/{split}.tsv in its sources)")
    xq, _ = router.prepare(dataset.queries(split))
    gold = gold_sources(router, dataset, split)
    if (gold < 0).any():
        raise ValueError(
            f"{int((gold < 0).sum())} {split!r} queries have their relevant documents in a source this "
            f"checkpoint has no expert for (sources {dataset.sources}, experts {router.expert_names})"
        )
    lookup = DocLookup(router)
    E, depth = router.num_experts, min(DEPTH, router.ntotal)

    def measure(
        sel: Selection, probs: np.ndarray | None = None, prior_weight: float = 0.0, decide_weight: float = 0.0
    ) -> dict[str, float]:
        # The gate's hits are merged as its checkpoint says (score + prior_weight * log p, or re-decided
        # with decide_weight); the baselines' by score, as they were designed (their probabilities are a
        # softmax fitted afterwards)
        rows, _, scanned = prefix_search(router, xq, depth, sel, probs, prior_weight, decide_weight)
        return {
            **ir_metrics(lookup.run(qids, rows), qrels),
            "relevant_share": relevant_share(sel, qids, qrels, lookup),
            "sources": sel.mean_experts,
            "scanned": float(scanned.mean() / router.ntotal),
        }

    flat, ids = exhaustive_index(router.experts)
    _, flat_rows = flat.search(xq, depth)
    exhaustive = {
        **ir_metrics(lookup.run(qids, ids[flat_rows]), qrels),
        "relevant_share": 1.0,
        "sources": float(E),
        "scanned": 1.0,
    }
    oracle = measure(fixed_selection(gold[:, None]))

    calib = labelled_queries(router, dataset, "val")  # the judgments the gate's own temperature is fitted on
    # name -> (scores, the row's fixed facts: whether routing scans everything, vectors it compares to route)
    scorers: dict[str, tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]] = {
        GATE: (router.gate_probs, {"scans_everything": False})
    }
    quiet = len(xq) * router.ntotal < 10**8
    for b in tqdm(build_baselines(router, dataset, baselines, seed), desc="building baselines", disable=quiet):
        facts = {"scans_everything": b.scans_everything, **getattr(b, "facts", {})}
        if hasattr(b, "scanned"):  # ReDDE style searches its sample to route: part of its cost
            facts["routing_scanned"] = b.scanned / router.ntotal
        scorers[b.name] = (b.scores, facts)

    routers: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[FrontierPoint]] = {}
    scores: dict[str, np.ndarray] = {}
    for name, (fn, facts) in tqdm(scorers.items(), desc="routing and searching", disable=quiet):
        scores[name] = fn(xq)
        if name == GATE:
            probs, temperature = scores[name], float(router.gate.temperature)
        else:
            probs, temperature = baseline_probs(
                scores[name], fn(calib[0]) if calib else None, calib[1] if calib else None
            )
        weight = router.prior_weight if name == GATE else 0.0
        decide = router.decide_weight if name == GATE else 0.0
        p15 = p_at_cost(probs, 1.5, max_experts)  # top-p at a matched cost: 1.5 sources on average
        settings = {
            "1": top_k_selection(probs, 1),
            "adaptive": top_p_selection(probs, top_p, max_experts),
            "1.5_sources": top_p_selection(probs, p15, max_experts),
        }
        if E >= 2:
            settings["2"] = top_k_selection(probs, 2)
        row: dict[str, Any] = {
            **facts,
            "temperature": temperature,
            "prior_weight": weight,
            "decide_weight": decide,
            "p@1.5_sources": p15,
            "source_acc@1": accuracy_at_k(probs, gold, 1),
            "ece": expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == gold),
        }
        for setting, sel in settings.items():
            row.update({f"{key}@{setting}": v for key, v in measure(sel, probs, weight, decide).items()})
        routers[name] = row

        def quality(
            sel: Selection, probs: np.ndarray = probs, weight: float = weight, decide: float = decide
        ) -> tuple[float, float]:
            m = measure(sel, probs, weight, decide)
            return m["ndcg@10"], m["scanned"]

        curves[name] = frontier(probs, quality, max_experts, top_k, p_grid)
    routers[EXHAUSTIVE] = {"scans_everything": True, **{f"{key}@exhaustive": v for key, v in exhaustive.items()}}
    routers[ORACLE] = {
        "scans_everything": False,
        "source_acc@1": 1.0,
        **{f"{key}@oracle": v for key, v in oracle.items()},
    }

    gate = routers[GATE]
    report: dict[str, Any] = {
        "kind": "retrieval",
        "checkpoint": checkpoint,
        "dataset": dataset.name,
        "split": split,
        "queries": len(qids),
        "experts": E,
        "vectors": router.ntotal,
        "top_p": float(top_p),
        "max_experts": max_experts,
        "prior_weight": router.prior_weight,
        "decide_weight": router.decide_weight,
        **{key: v for key, v in gate.items() if key != "scans_everything"},
        **{f"{key}@exhaustive": v for key, v in exhaustive.items()},
        **{f"{key}@oracle": v for key, v in oracle.items()},
        "routers": routers,
        "frontier": {name: [vars(p) for p in pts] for name, pts in curves.items()},
        "calibration": calibration_report(router, xq, scores[GATE], gold),
        "baseline_temperature_fit": (
            "softmax(score / T), T fitted by NLL on the 'val' (BEIR dev) judgments"
            if calib
            else "softmax(score), T = 1 (no validation judgments)"
        ),
    }
    report["ece"] = report["calibration"]["calibrated"]["ece"]
    report["ece_noise_floor"] = report["calibration"]["calibrated"]["ece_noise_floor"]
    return report, scores
