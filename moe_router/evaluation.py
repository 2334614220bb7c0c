"""Offline evaluation of a checkpoint: routing accuracy, recall@10 vs exhaustive search, cost, speed.

Dimension legend: n test queries, E experts, t experts searched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from moe_router.data import TextDataset
from moe_router.experts import lower_blas_threshold
from moe_router.metrics import accuracy_at_k, load_stats, recall_at_k, top_experts
from moe_router.router import Router


def exhaustive_index(router: Router) -> tuple[faiss.Index, np.ndarray]:
    """One flat index over every expert's vectors, and the global id of each of its rows."""
    index = faiss.IndexFlatIP(router.dim) if router.metric == "ip" else faiss.IndexFlatL2(router.dim)
    for e in router.experts:
        index.add(e.vectors())
    return index, np.concatenate([e.ids for e in router.experts])


def gold_experts(router: Router, dataset: TextDataset, split: str) -> np.ndarray:
    """(n,) index into router.experts of each record's expert (-1 when the router has no such expert)."""
    index = {name: i for i, name in enumerate(router.expert_names)}
    return np.array([index.get(getattr(r, dataset.expert_key), -1) for r in dataset.split(split)], dtype=np.int64)


def routing_metrics(
    router: Router, xq: np.ndarray, probs: np.ndarray, gold: np.ndarray, exact_ids: np.ndarray,
    experts_searched: list[int], k: int = 10,
) -> dict[str, Any]:
    """acc@1, acc@2, recall@k and scanned share at each number of experts searched, and top-1 load."""
    out: dict[str, Any] = {"acc@1": accuracy_at_k(probs, gold, 1)}
    if router.num_experts >= 2:
        out["acc@2"] = accuracy_at_k(probs, gold, 2)
    for t in experts_searched:
        if t > router.num_experts:
            continue
        res = router.search_experts(xq, k, top_experts(probs, t))
        out[f"recall@{k}@{t}"] = recall_at_k(res.I, exact_ids)
        out[f"scanned@{t}"] = float(res.scanned.mean() / router.ntotal)
    out["load@1"] = load_stats(top_experts(probs, 1), router.num_experts)
    return out


def time_search(router: Router, xq: np.ndarray, flat: faiss.Index, k: int, top: int, repeats: int = 3) -> dict[str, float]:
    """Queries/s of gate + routed search vs one exhaustive flat search, same queries, same run (best of repeats)."""
    lower_blas_threshold()

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    routed = best(lambda: router.search_experts(xq, k, top_experts(router.gate_probs(xq), top)))
    exhaustive = best(lambda: flat.search(xq, k))
    n = xq.shape[0]
    return {"routed_qps": n / routed, "exhaustive_qps": n / exhaustive, "speedup": exhaustive / routed}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the checkpoint cfg.ckpt on cfg.data's `cfg.split` split; write cfg.report (JSON) if set."""
    router = Router.load(cfg.ckpt, cache_dir=cfg.cache_dir)
    dataset: TextDataset = instantiate(cfg.data)
    records = dataset.split(cfg.split)
    if not records:
        raise ValueError(f"dataset {dataset.name!r} has no {cfg.split!r} rows to evaluate on")
    gold = gold_experts(router, dataset, cfg.split)
    xq, _ = router.prepare_queries([r.text for r in records])
    probs = router.gate_probs(xq)
    flat, ids = exhaustive_index(router)
    _, rows = flat.search(xq, cfg.k)
    exact_ids = ids[rows]
    report: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt),
        "dataset": dataset.name,
        "split": cfg.split,
        "queries": len(records),
        "experts": router.num_experts,
        "vectors": router.ntotal,
        "unknown_gold": int((gold < 0).sum()),
    }
    report.update(routing_metrics(router, xq, probs, gold, exact_ids, list(cfg.experts_searched), cfg.k))
    report["speed"] = time_search(router, xq, flat, cfg.k, min(2, router.num_experts))
    if cfg.report:
        Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.report).write_text(json.dumps(report, indent=2))
    return report
