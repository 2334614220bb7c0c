"""Evaluation of a router on queries with a gold expert (intent data, vectors of a k-means partition).

Routing accuracy, recall@k against exhaustive search, scanned share, load, calibration, out-of-scope
detection and speed, for the gate and every baseline side by side.

Dimension legend: n test queries, E experts, t experts searched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from moe_router.data.base import Dataset
from moe_router.eval.adaptive import (
    P_GRID,
    Selection,
    baseline_probs,
    check_top_p,
    frontier,
    p_at_cost,
    prefix_search,
    top_p_selection,
)
from moe_router.eval.baselines import BASELINES, GATE, LogisticRegressionRouter, ivf_recall
from moe_router.eval.calibration import calibrated_with_bias, calibration_report
from moe_router.gate.model import in_scope
from moe_router.index.clustering import nearest_centroid
from moe_router.index.exact import exhaustive_index
from moe_router.index.expert import centroids
from moe_router.metrics import (
    accuracy_at_k,
    assign_with_capacity,
    auroc,
    expected_calibration_error,
    load_stats,
    overlap_at_k,
    top_experts,
)
from moe_router.routing.router import Router
from moe_router.types import SearchParams


def gold_indices(router: Router, labels: list[str]) -> np.ndarray:
    """(n,) index into router.experts of each query's expert (-1 when the router has no such expert)."""
    index = {name: i for i, name in enumerate(router.expert_names)}
    return np.array([index.get(label, -1) for label in labels], dtype=np.int64)


def routing_metrics(
    router: Router,
    xq: np.ndarray,
    probs: np.ndarray,
    gold: np.ndarray,
    exact_ids: np.ndarray,
    experts_searched: list[int],
    k: int = 10,
) -> dict[str, Any]:
    """acc@1, acc@2, recall@k and scanned share at each number of experts searched, and top-1 load."""
    out: dict[str, Any] = {"acc@1": accuracy_at_k(probs, gold, 1)}
    if router.num_experts >= 2:
        out["acc@2"] = accuracy_at_k(probs, gold, 2)
    for t in experts_searched:
        if t > router.num_experts:
            continue
        res = router.search_experts(xq, k, top_experts(probs, t))
        out[f"recall@{k}@{t}"] = overlap_at_k(res.I, exact_ids)
        out[f"scanned@{t}"] = float(res.scanned.mean() / router.ntotal)
    out["load@1"] = load_stats(top_experts(probs, 1), router.num_experts)
    return out


def latency(
    router: Router,
    xq: np.ndarray,
    flat: faiss.Index,
    k: int,
    top: int,
    batch: int,
    repeats: int = 3,
    max_batches: int = 200,
) -> dict[str, float]:
    """Per-batch latency (p50/p99, ms) and queries/s of gate + routed search vs exhaustive flat search.

    Both run on the same batches in the same loop (interleaved), so machine noise hits both alike.
    Also reports the gate's share of the routed time.
    """
    batches = [xq[i : i + batch] for i in range(0, len(xq) - batch + 1, batch)][:max_batches] or [xq]
    gate_t, routed_t, flat_t = [], [], []
    for _ in range(repeats):
        for b in batches:
            t0 = time.perf_counter()
            probs = router.gate_probs(b)
            t1 = time.perf_counter()
            router.search_experts(b, k, top_experts(probs, top))
            t2 = time.perf_counter()
            flat.search(b, k)
            t3 = time.perf_counter()
            gate_t.append(t1 - t0)
            routed_t.append(t2 - t0)
            flat_t.append(t3 - t2)
    routed, exhaustive = np.array(routed_t), np.array(flat_t)
    n = len(batches[0])
    return {
        "batch": n,
        "routed_qps": n / float(np.median(routed)),
        "exhaustive_qps": n / float(np.median(exhaustive)),
        "speedup": float(np.median(exhaustive) / np.median(routed)),
        "routed_p50_ms": 1e3 * float(np.percentile(routed, 50)),
        "routed_p99_ms": 1e3 * float(np.percentile(routed, 99)),
        "exhaustive_p50_ms": 1e3 * float(np.percentile(exhaustive, 50)),
        "exhaustive_p99_ms": 1e3 * float(np.percentile(exhaustive, 99)),
        "gate_share": float(np.sum(gate_t) / np.sum(routed_t)),
    }


IVF = "FAISS IVF-Flat (own k-means, nprobe = experts)"


FLAT = "exhaustive flat"


def evaluate_intents(
    router: Router,
    dataset: Dataset,
    split: str = "test",
    k: int = 10,
    experts_searched: Sequence[int] = (1, 2, 4),
    baselines: Sequence[str] = tuple(BASELINES),
    capacity_factor: float | None = 1.25,
    speed_batches: Sequence[int] = (1, 100, 1000),
    seed: int = 0,
    checkpoint: str = "",
    top_p: float = 0.9,
    max_experts: int = 4,
    p_grid: Sequence[float] = P_GRID,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluate `router` on `dataset`'s `split` against the baselines: (report, each router's scores (n, E)).

    The report's top-level keys acc@1, acc@2, recall@10@t, scanned@t are the gate's; `routers` holds every row;
    `frontier` each router's recall@k against experts searched for top-k 1..4 and top-p over `p_grid`.
    """
    check_top_p(top_p, p_grid)
    queries = dataset.queries(split)
    if not len(queries):
        raise ValueError(f"dataset {dataset.name!r} has no {split!r} rows to evaluate on")
    xq, _ = router.prepare(queries)
    partition = router.config.get("partition")
    gold = split_gold(router, dataset, split, xq, checkpoint)
    k = router.check_params(SearchParams(k=int(k))).k
    searched = [t for t in experts_searched if t <= router.num_experts]
    flat, ids = exhaustive_index(router.experts)
    _, rows = flat.search(xq, k)
    exact = ids[rows]

    scorers: dict[str, Callable[[np.ndarray], np.ndarray]] = {GATE: router.gate_probs}
    routers: dict[str, dict[str, Any]] = {GATE: {"scans_everything": False}}
    unknown = [key for key in baselines if key not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; expected some of {sorted(BASELINES)}")
    quiet = len(xq) * router.ntotal < 10**8  # progress bars only for runs that take more than a few seconds
    calib = calibration_labels(router, dataset)
    for key in tqdm(baselines, desc="building baselines", disable=quiet):
        if key == "logreg":  # calibrated on the validation queries the gate's temperature is fitted on
            baseline = LogisticRegressionRouter(
                router, calib=calib, bias=calibrated_with_bias(router, dataset), seed=seed
            )
        else:
            baseline = BASELINES[key](router)
        scorers[baseline.name] = baseline.scores
        routers[baseline.name] = {"scans_everything": baseline.scans_everything, **getattr(baseline, "facts", {})}
    scores: dict[str, np.ndarray] = {}
    for name, fn in tqdm(scorers.items(), desc="routing and searching", disable=quiet):
        scores[name] = fn(xq)
        routers[name].update(routing_metrics(router, xq, scores[name], gold, exact, searched, k))
    probs = scores[GATE]
    adaptive = adaptive_report(router, calib, xq, gold, exact, scorers, scores, routers, k, top_p, max_experts, p_grid)
    routers[IVF] = {"scans_everything": False}
    for t, (rec, scanned) in ivf_recall(router, xq, exact, searched, k, seed=seed).items():
        routers[IVF][f"recall@{k}@{t}"], routers[IVF][f"scanned@{t}"] = rec, scanned
    routers[FLAT] = {
        "scans_everything": True,
        **{f"recall@{k}@{t}": 1.0 for t in searched},
        **{f"scanned@{t}": 1.0 for t in searched},
    }

    report: dict[str, Any] = {
        "checkpoint": checkpoint,
        "dataset": dataset.name,
        "split": split,
        "queries": len(queries),
        "experts": router.num_experts,
        "vectors": router.ntotal,
        "unknown_gold": int((gold < 0).sum()),
        "partition": partition,  # k-means experts: gold = nearest centroid
        **{key: v for key, v in routers[GATE].items() if key != "scans_everything"},
        "routers": routers,
        **adaptive,
    }
    if capacity_factor:
        report["capacity"] = capacity_report(
            router, xq, probs, exact, min(2, router.num_experts), k, float(capacity_factor)
        )
    report["calibration"] = calibration_report(router, xq, probs, gold)
    oos = dataset.oos_texts(split)
    if oos:
        report["out_of_scope"] = oos_report(router, oos, xq, scorers, scores, routers)
    top = min(2, router.num_experts)
    batches = [b for b in speed_batches if b <= len(xq)]
    report["speed"] = {
        f"batch_{b}": latency(router, xq, flat, k, top, b)
        for b in tqdm(batches, desc="timing routed vs exhaustive", disable=quiet)
    }
    report["experts_searched"] = searched
    report["k"] = k
    return report, scores


def split_gold(
    router: Router, dataset: Dataset, split: str, xq: np.ndarray | None = None, checkpoint: str | None = None
) -> np.ndarray:
    """(n,) gold expert index of each of the split's queries (-1: an expert the router lacks).

    With k-means experts (trained with partition=N) the gold expert is the shard of the nearest
    centroid; else the query's labelled expert. `xq`: the split's query vectors, when already at hand.
    """
    if router.config.get("partition"):
        xq = router.prepare(dataset.queries(split))[0] if xq is None else xq
        return nearest_centroid(xq, centroids(router.experts), router.metric)
    labels = dataset.gold_experts(split)
    if labels is None:
        raise ValueError(
            f"dataset {dataset.name!r} has no labels, so it can only evaluate a checkpoint whose "
            f"experts are a k-means partition (trained with partition=N); {checkpoint or 'this one'} is not"
        )
    return gold_indices(router, labels)


def calibration_labels(router: Router, dataset: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """(xq, gold) of the validation split the gate's temperature is fitted on; None when it is absent or unlabelled."""
    queries = dataset.queries("val")
    if not len(queries):
        return None
    xv, _ = router.prepare(queries)
    if not router.config.get("partition") and dataset.gold_experts("val") is None:
        return None
    return xv, split_gold(router, dataset, "val", xv)


def adaptive_report(
    router: Router,
    calib: tuple[np.ndarray, np.ndarray] | None,
    xq: np.ndarray,
    gold: np.ndarray,
    exact: np.ndarray,
    scorers: dict[str, Callable[[np.ndarray], np.ndarray]],
    scores: dict[str, np.ndarray],
    routers: dict[str, dict[str, Any]],
    k: int,
    top_p: float,
    max_experts: int,
    p_grid: Sequence[float],
) -> dict[str, Any]:
    """Top-p rows (recall@k, experts and scanned share at p = top_p), each router's ECE and its frontier.

    The gate's probabilities are its calibrated ones; a baseline's scores go through softmax(s / T)
    with T fitted by NLL on the validation split `calib` (adaptive.baseline_probs).
    """
    max_experts = min(int(max_experts), router.num_experts)
    if max_experts < 1:
        raise ValueError(f"max_experts must be at least 1, got {max_experts}")
    known = gold >= 0
    sizes = np.array([e.ntotal for e in router.experts], dtype=np.float64)  # (E,)

    def quality(sel: Selection) -> tuple[float, float]:
        ids, _, scanned = prefix_search(router, xq, k, sel)
        return overlap_at_k(ids, exact), float(scanned.mean() / router.ntotal)

    curves: dict[str, list[dict[str, Any]]] = {}
    for name, fn in scorers.items():
        if name == GATE:
            probs, temperature = scores[name], float(router.gate.temperature)
        else:
            probs, temperature = baseline_probs(
                scores[name], fn(calib[0]) if calib else None, calib[1] if calib else None
            )
        sel = top_p_selection(probs, top_p, max_experts)
        rec, scanned = quality(sel)
        row = routers[name]
        row.update(
            {
                f"recall@{k}@adaptive": rec,
                "experts@adaptive": sel.mean_experts,
                "scanned@adaptive": scanned,
                "temperature": temperature,
                "ece": expected_calibration_error(probs.max(axis=1)[known], (probs.argmax(axis=1) == gold)[known]),
            }
        )
        # top-p at matched cost: 1.5 experts on average, and the share top-2 scans (p found by bisection)
        for label, target, by_size in (("1.5_experts", 1.5, None), ("top2_scanned", row.get("scanned@2"), sizes)):
            if target is None:
                continue
            p = p_at_cost(probs, target, max_experts, by_size)
            sel = top_p_selection(probs, p, max_experts)
            rec, scanned = quality(sel)
            row.update(
                {
                    f"recall@{k}@{label}": rec,
                    f"p@{label}": p,
                    f"experts@{label}": sel.mean_experts,
                    f"scanned@{label}": scanned,
                }
            )
        curves[name] = [vars(point) for point in frontier(probs, quality, max_experts, p_grid=p_grid)]
    matched = ("@adaptive", "@1.5_experts", "@top2_scanned")
    return {
        "top_p": float(top_p),
        "max_experts": max_experts,
        **{key: v for key, v in routers[GATE].items() if key.endswith(matched)},
        "frontier": curves,
        "baseline_temperature_fit": (
            "softmax(score / T), T fitted by NLL on the 'val' split"
            if calib
            else "softmax(score), T = 1 (no labelled 'val' split)"
        ),
    }


def capacity_report(
    router: Router, xq: np.ndarray, probs: np.ndarray, exact_ids: np.ndarray, t: int, k: int, factor: float
) -> dict[str, float]:
    """Serving-time capacity: load and recall@k with each expert capped at factor x the mean load (this batch)."""
    capped = assign_with_capacity(probs, t, factor)
    free = top_experts(probs, t)
    return {
        "factor": factor,
        "experts_searched": t,
        "max_over_mean": load_stats(capped, router.num_experts)["max_over_mean"],
        "max_over_mean_uncapped": load_stats(free, router.num_experts)["max_over_mean"],
        f"recall@{k}": overlap_at_k(router.search_experts(xq, k, capped).I, exact_ids),
        f"recall@{k}_uncapped": overlap_at_k(router.search_experts(xq, k, free).I, exact_ids),
    }


def oos_report(
    router: Router,
    oos_texts: list[str],
    xq: np.ndarray,
    scorers: dict[str, Callable],
    scores: dict[str, np.ndarray],
    routers: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """AUROC of each router's top-1 score, in-scope (positive) vs out-of-scope; the gate's
    abstention at its threshold."""
    xo, _ = router.prepare(oos_texts)
    out: dict[str, Any] = {"queries": len(oos_texts)}
    for name, fn in scorers.items():
        if name == GATE:  # the gate's own in-scope score (prototype similarity, or top-1 probability)
            gi, go = in_scope(router.gate, xq), in_scope(router.gate, xo)
            routers[name]["oos_auroc"] = auroc(gi, go)
            routers[name]["oos_auroc_top1_prob"] = auroc(scores[name].max(axis=1), fn(xo).max(axis=1))
        elif name != "random":
            routers[name]["oos_auroc"] = auroc(scores[name].max(axis=1), fn(xo).max(axis=1))
    if router.abstain_threshold is not None:
        th = router.abstain_threshold
        out["threshold"] = th
        out["in_scope_kept"] = float((gi >= th).mean())
        out["oos_refused"] = float((go < th).mean())
    return out
