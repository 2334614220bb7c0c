"""Routing real questions to the source holding their answer: dev source acc@1 and ECE, gate vs baselines.

    python benchmarks/retrieval_routing.py --data stackexchange
    python benchmarks/retrieval_routing.py --data classic targets.query_weight=0 --json out.json

Trains the gate through the real Hydra configs (scripts/train.py's train(); any override may follow),
then scores the dev queries (BEIR 'dev' judgments: the gold source is the one holding the relevant
documents) with the gate and with the untrained baselines of eval/baselines.py over the same
experts. ECE is measured twice: at the checkpoint's temperature (fitted on the same dev queries, so
in-sample) and cross-fitted (temperature fitted on one half of dev, ECE on the other, both ways).
Embeddings go through the shared cache (cache_dir, default $MOE_ROUTER_CACHE).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from moe_router.apps.train import train
from moe_router.eval.baselines import CentroidRouter, MultiPrototypeRouter, SemanticRouterStyle
from moe_router.gate.confidence import fit_temperature, softmax
from moe_router.gate.model import infer
from moe_router.metrics import accuracy_at_k, expected_calibration_error
from moe_router.routing.router import Router

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def cross_fitted_ece(logits: np.ndarray, gold: np.ndarray, seed: int = 0) -> float:
    """ECE of the top-1 probability with the temperature fitted on the other half of the queries (2 folds)."""
    order = np.random.default_rng(seed).permutation(len(gold))
    halves = (order[: len(order) // 2], order[len(order) // 2 :])
    conf, correct = np.empty(len(gold)), np.empty(len(gold))
    for fit, test in (halves, halves[::-1]):
        p = softmax(logits[test], fit_temperature(logits[fit], gold[fit]))
        conf[test], correct[test] = p.max(1), p.argmax(1) == gold[test]
    return expected_calibration_error(conf, correct)


def run(data: str, overrides: list[str], work: Path) -> dict:
    """Train on `data` with `overrides`; dev acc@1 / ECE of the gate and acc@1 of each baseline."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(
            "train",
            [
                f"data={data}",
                f"out={work / 'ckpt'}",
                f"log_dir={work / 'logs'}",
                "trainer.enable_progress_bar=false",
                *overrides,
            ],
        )
    start = time.perf_counter()
    result = train(cfg)
    train_seconds = time.perf_counter() - start
    router = Router.load(cfg.out)
    dataset = instantiate(cfg.data)
    xq, _ = router.prepare(dataset.queries("dev"))
    gold = np.array([router.expert_indices([s])[0] for s in dataset.gold_sources("dev")])
    probs, logits = router.gate_probs(xq), infer(router.gate, xq, "logits")
    rows = {
        "gate (ours)": {
            "acc@1": accuracy_at_k(probs, gold, 1),
            "acc@2": accuracy_at_k(probs, gold, 2),
            "ece": expected_calibration_error(probs.max(1), probs.argmax(1) == gold),
            "ece_cross_fitted": cross_fitted_ece(logits, gold, cfg.seed),
            "ece_uncalibrated": expected_calibration_error(softmax(logits).max(1), logits.argmax(1) == gold),
        }
    }
    for baseline in (
        CentroidRouter(router),
        MultiPrototypeRouter(router, 64, cfg.seed),
        SemanticRouterStyle(router, 5),
    ):
        scores = baseline.scores(xq)
        rows[baseline.name] = {"acc@1": accuracy_at_k(scores, gold, 1), "acc@2": accuracy_at_k(scores, gold, 2)}
    return {
        "data": data,
        "overrides": overrides,
        "dev_queries": len(gold),
        "experts": router.num_experts,
        "documents": router.ntotal,
        "train_seconds": train_seconds,
        "fit_seconds": result.metrics["fit_seconds"],
        "temperature": float(router.gate.temperature),
        "routers": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default="stackexchange", help="data config: classic | stackexchange | beir (+ data.root=)"
    )
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of configs/train.yaml, e.g. targets.query_weight=0.7"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="retrieval_routing-") as work:
        result = run(args.data, args.overrides, Path(work))
    print(
        f"{result['data']} dev ({result['dev_queries']} queries, {result['experts']} sources, "
        f"{result['documents']} documents); train {result['train_seconds']:.0f} s (fit {result['fit_seconds']:.0f} s); "
        f"overrides {args.overrides}"
    )
    print("| router | acc@1 | acc@2 | ECE | ECE cross-fitted |\n|---|---|---|---|---|")
    for name, r in result["routers"].items():
        ece = f"{r['ece']:.3f} | {r['ece_cross_fitted']:.3f}" if "ece" in r else "- | -"
        print(f"| {name} | {r['acc@1']:.3f} | {r['acc@2']:.3f} | {ece} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
