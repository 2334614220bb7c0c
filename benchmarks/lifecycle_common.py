"""Shared pieces of the lifecycle benchmarks: CLINC150 with cached MiniLM vectors, the project's
full training (configs/train.yaml as scripts/train.py uses it: the hybrid MLP + prototype gate,
30 epochs, mix targets, best epoch by val/recall@10), cached trained routers, the metrics of moe_router.metrics.

Dimension legend: n queries, E experts, t experts searched, k hits.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from moe_router.apps.train import resolve_monitor
from moe_router.data.datasets import TextDataset, load_dataset
from moe_router.embed.cache import CachedEmbedder, default_cache_dir
from moe_router.embed.minilm import MiniLMEmbedder
from moe_router.gate import with_prototypes
from moe_router.index.exact import exhaustive_index
from moe_router.metrics import accuracy_at_k, overlap_at_k, top_experts
from moe_router.routing.router import Router
from moe_router.train.fit import fit_router

REPO = Path(__file__).resolve().parents[1]
CLINC = REPO.parent / "shared" / "datasets" / "clinc150" / "clinc150.jsonl"
CONFIGS = REPO / "configs"


def embedder() -> CachedEmbedder:
    return CachedEmbedder(MiniLMEmbedder(), default_cache_dir())


def clinc(path: str | Path = CLINC, expert_key: str = "domain", parent_key: str | None = None) -> TextDataset:
    return load_dataset(str(path), name="clinc150", expert_key=expert_key, parent_key=parent_key)


@dataclass(frozen=True)
class Timed:
    seconds: float  # wall
    cpu_seconds: float  # process CPU time


def train_config(**overrides: str):
    """configs/train.yaml as scripts/train.py composes it (model=hybrid, 30 epochs, mix targets, ...)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=[f"{k}={v}" for k, v in overrides.items()])


def full_train(router: Router, val_texts: list[str], val_experts: list[str], seed: int = 0) -> Timed:
    """The project's full training as scripts/train.py runs it (its config's model, module, trainer and
    targets; no temperature calibration, which changes no ranking), timed end to end."""
    cfg = train_config(seed=str(seed))
    monitor = resolve_monitor(cfg.monitor, retrieval=False)
    wall, cpu = time.perf_counter(), time.process_time()
    L.seed_everything(seed, workers=True, verbose=False)
    gate = with_prototypes(instantiate(cfg.model, dim=router.dim, num_experts=router.num_experts), router.experts, seed)
    module = instantiate(cfg.module)(gate=gate)
    trainer = instantiate(
        cfg.trainer,
        enable_progress_bar=False,
        logger=False,
        callbacks=[
            ModelCheckpoint(
                dirpath=tempfile.mkdtemp(prefix="lifecycle-bench-"), monitor=monitor, mode="max", save_top_k=1
            )
        ],
    )
    fit_router(
        router,
        val_queries=val_texts,
        val_experts=val_experts,
        targets=cfg.targets.kind,
        label_weight=cfg.targets.label_weight,
        neighbours=cfg.targets.neighbours,
        max_queries=cfg.targets.max_queries,
        module=module,
        trainer=trainer,
        batch_size=cfg.batch_size,
        monitor=monitor,
        seed=seed,
    )
    return Timed(time.perf_counter() - wall, time.process_time() - cpu)


def trained(
    path: Path, build, val_texts: list[str], val_experts: list[str], seed: int = 0
) -> tuple[Router, Timed, bool]:
    """Load the router cached at `path`, or build it, fully train it and cache it. (router, training time, was cached)."""
    if (path / "manifest.json").is_file():
        router = Router.load(path, cache_dir=default_cache_dir())
        m = router.metrics
        return router, Timed(m["train_seconds"], m["train_cpu_seconds"]), True
    router = build()
    t = full_train(router, val_texts, val_experts, seed=seed)
    router.set_training_info(router.config, {"train_seconds": t.seconds, "train_cpu_seconds": t.cpu_seconds})
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
    index, ids = exhaustive_index(router)
    _, I = index.search(xq, 10)
    return ids[I]
