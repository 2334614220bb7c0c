"""Shared pieces of the lifecycle benchmarks: CLINC150 with cached MiniLM vectors, the project's
full training (train_router with configs/train.yaml as scripts/train.py composes it: the hybrid MLP +
prototype gate, its trainer, mix targets, best epoch by val/recall@10), cached trained routers, the
metrics of moe_router.metrics.

Dimension legend: n queries, E experts, t experts searched, k hits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from moe_router.apps.train import train_config
from moe_router.checkpoint.format import POINTER
from moe_router.data.datasets import TextDataset, load_dataset
from moe_router.embed.cache import CachedEmbedder, default_cache_dir
from moe_router.embed.hashing import HashingEmbedder
from moe_router.embed.minilm import MiniLMEmbedder
from moe_router.index.exact import exhaustive_index
from moe_router.metrics import accuracy_at_k, overlap_at_k, top_experts
from moe_router.routing.router import Router
from moe_router.train.pipeline import train_router

REPO = Path(__file__).resolve().parents[1]
CLINC = REPO.parent / "shared" / "datasets" / "clinc150" / "clinc150.jsonl"
CONFIGS = REPO / "configs"


# --smoke: a seconds-long run of a benchmark's every step (its numbers mean nothing): a few CLINC150 rows
# per intent and split, a hashing embedder instead of MiniLM, one training epoch, fresh caches.
SMOKE_ROWS = 3  # rows kept per (intent, split)
_smoke = False


def add_smoke_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="every step on toy data, in seconds (the tests run it)")


def apply_smoke(args: argparse.Namespace) -> None:
    """With --smoke: point args.data at a small CLINC150 sample and args.cache_dir at a fresh directory."""
    global _smoke
    if not getattr(args, "smoke", False):
        return
    _smoke = True
    work = Path(tempfile.mkdtemp(prefix="lifecycle-smoke-"))
    kept: dict[tuple[str, str], int] = {}
    with open(args.data) as src, open(work / "clinc150.jsonl", "w") as out:
        for line in src:
            row = json.loads(line)
            key = (row["label"], row["split"])
            if kept.get(key, 0) < SMOKE_ROWS:
                kept[key] = kept.get(key, 0) + 1
                out.write(line)
    args.data, args.cache_dir = str(work / "clinc150.jsonl"), str(work / "cache")
    if hasattr(args, "steps"):
        args.steps = 5


def embedder() -> CachedEmbedder:
    inner = HashingEmbedder(384) if _smoke else MiniLMEmbedder()
    return CachedEmbedder(inner, default_cache_dir())


def clinc(path: str | Path = CLINC, expert_key: str = "domain", parent_key: str | None = None) -> TextDataset:
    return load_dataset(str(path), name="clinc150", expert_key=expert_key, parent_key=parent_key)


@dataclass(frozen=True)
class Timed:
    seconds: float  # wall
    cpu_seconds: float  # process CPU time


def full_train(
    dataset: TextDataset, emb: CachedEmbedder, seed: int = 0, overrides: Sequence[str] = (), calibrate: bool = False
) -> tuple[Router, Timed]:
    """The project's full training as scripts/train.py runs it (configs/train.yaml's model, module, trainer and
    targets, with `overrides`; no calibration unless asked: the benchmarks compare routing, and the load floor
    would move it), timed end to end (building the experts from the cached embeddings included). Validation: the
    dataset's 'val' rows of its experts."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        smoke = ["trainer.max_epochs=1"] if _smoke else []
        cfg = compose("train", overrides=[f"seed={seed}", *smoke, *overrides])
    make_trainer = instantiate(cfg.trainer, _partial_=True)
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_router(
        dataset,
        emb,
        dataclasses.replace(train_config(cfg), calibrate=calibrate),
        gate=instantiate(cfg.model, _partial_=True),
        trainer=lambda callbacks, logger: make_trainer(callbacks=callbacks, logger=False, enable_progress_bar=False),
        module=instantiate(cfg.module),
        log_dir=tempfile.mkdtemp(prefix="lifecycle-bench-"),
    )
    return result.router, Timed(time.perf_counter() - wall, time.process_time() - cpu)


def trained(path: Path, dataset: TextDataset, emb: CachedEmbedder, seed: int = 0) -> tuple[Router, Timed, bool]:
    """The router cached at `path`, or else `dataset` fully trained and cached: (router, training time, was cached)."""
    if (path / POINTER).is_file():  # a saved checkpoint
        router = Router.load(path, cache_dir=default_cache_dir())
        m = router.metrics
        return router, Timed(m["train_seconds"], m["train_cpu_seconds"]), True
    router, t = full_train(dataset, emb, seed=seed)
    router.set_training_info(
        router.config, {**router.metrics, "train_seconds": t.seconds, "train_cpu_seconds": t.cpu_seconds}
    )
    router.save(path)
    return Router.load(path, cache_dir=default_cache_dir()), t, False


def routing_report(
    router: Router,
    xq: np.ndarray,
    gold: np.ndarray,
    flat_ids: np.ndarray,
    rows: np.ndarray,
    probs: np.ndarray | None = None,
) -> dict[str, float]:
    """acc@1 and recall@10 at 1 and 2 experts (routed top-10 vs exhaustive top-10) on the queries `rows`."""
    probs = router.gate_probs(xq[rows]) if probs is None else probs[rows]
    out = {"n": int(len(rows)), "acc@1": accuracy_at_k(probs, gold[rows], 1)}
    for t in (1, 2):
        res = router.search_experts(xq[rows], 10, top_experts(probs, t))
        out[f"recall@10@{t}"] = overlap_at_k(res.I, flat_ids[rows])
    return out


def exact_top10(router: Router, xq: np.ndarray) -> np.ndarray:
    """(n, 10) global ids of the exhaustive top-10 over every expert's vectors."""
    index, ids = exhaustive_index(router.experts)
    _, I = index.search(xq, 10)
    return ids[I]
