"""Add an expert at runtime (issue 4, measurement 1): train on 9 CLINC150 domains, add the 10th.

    python benchmarks/lifecycle_add.py [--new-domain travel] [--cache-dir reports/tmp/lifecycle_hybrid]

Prints, on the test split: the new expert's acc@1 and recall@10 (at 1 and 2 experts searched)
right after adding it (with and without the fitted row) and after adaptation.fine_tune, the other experts' acc@1 and
recall@10 before the add, after it, after the fine-tune and with a full retrain on all 10
domains; and the fine-tune's time as a share of the full training's (wall and CPU time).
The fully trained routers are cached in --cache-dir (their training time is stored with them).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from lifecycle_common import (
    CLINC,
    add_smoke_flag,
    apply_smoke,
    clinc,
    embedder,
    exact_top10,
    full_train,
    routing_report,
    trained,
)

from moe_router.data.datasets import TextDataset
from moe_router.embed.cache import default_cache_dir
from moe_router.routing.router import Router
from moe_router.train.finetune import FineTuneConfig, fine_tune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(CLINC))
    p.add_argument("--new-domain", default="travel", help="the domain held out of training and added at runtime")
    p.add_argument("--cache-dir", default="reports/tmp/lifecycle_hybrid", help="fully trained routers are cached here")
    p.add_argument("--steps", type=int, default=FineTuneConfig.steps, help="fine-tune optimiser steps")
    p.add_argument("--replay", type=float, default=FineTuneConfig.replay, help="old vectors replayed per new vector")
    p.add_argument("--head-only", action="store_true", help="fine-tune only the gate's head")
    p.add_argument(
        "--fresh-full",
        action="store_true",
        help="train the 10-expert router in this run (so both times come from one run) instead of the cache",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    add_smoke_flag(p)
    args = p.parse_args()
    apply_smoke(args)

    emb = embedder()
    ds = clinc(args.data)
    new = args.new_domain
    if new not in ds.experts:
        raise SystemExit(f"--new-domain {new!r} is not a domain of {args.data}; domains: {ds.experts}")
    ds9 = TextDataset(ds.name, [r for r in ds.records if not (r.split == "train" and r.domain == new)], "domain")
    cache = Path(args.cache_dir)

    r9, t9, _ = trained(cache / f"clinc150-without-{new}", ds9, emb, args.seed)  # validates on the 9 domains' rows
    if args.fresh_full:  # time the full retrain in this run, next to the fine-tune (not cached)
        (r10, t10), cached10 = full_train(ds, emb, seed=args.seed), False
    else:
        r10, t10, cached10 = trained(cache / "clinc150-10", ds, emb, args.seed)

    test = ds.split("test")
    xq = emb.encode([r.text for r in test])
    domains = np.array([r.domain for r in test])
    is_new = np.flatnonzero(domains == new)
    is_old = np.flatnonzero(domains != new)

    def gold_of(router: Router) -> np.ndarray:
        index = {n: i for i, n in enumerate(router.expert_names)}
        return np.array([index.get(d, -1) for d in domains])

    results: dict[str, dict] = {}
    ex9 = exact_top10(r9, xq)
    results["9 experts (before)"] = {"old": routing_report(r9, xq, gold_of(r9), ex9, is_old)}
    train_new = [r for r in ds.split("train") if r.domain == new]
    texts = [r.text for r in train_new]
    meta = [{"label": r.label, "domain": r.domain} for r in train_new]
    cfg = FineTuneConfig(steps=args.steps, replay=args.replay, train_body=not args.head_only, seed=args.seed)
    tunes = {}
    # Two ways to grow the gate, each followed by the same fine-tune: fit_row=False (Gate.add_expert's row
    # at the new vectors' mean feature) and the default add_expert (that row fitted against the others).
    for label, fit_row in (("add_expert(fit_row=False)", False), ("add_expert", True)):
        router = Router.load(cache / f"clinc150-without-{new}", cache_dir=default_cache_dir())
        start = time.perf_counter()
        router.add_expert(new, texts=texts, metadata=meta, fit_row=fit_row)
        add_seconds = time.perf_counter() - start
        ex = exact_top10(router, xq)
        gold = gold_of(router)
        results[f"after {label}"] = {
            "new": routing_report(router, xq, gold, ex, is_new),
            "old": routing_report(router, xq, gold, ex, is_old),
            "seconds": add_seconds,
        }
        tunes[label] = fine_tune(router, [new], cfg)
        results[f"{label} + fine-tune"] = {
            "new": routing_report(router, xq, gold, ex, is_new),
            "old": routing_report(router, xq, gold, ex, is_old),
        }
    ft = tunes["add_expert"]

    ex10 = exact_top10(r10, xq)
    g10 = gold_of(r10)
    results["full retrain, 10 experts"] = {
        "new": routing_report(r10, xq, g10, ex10, is_new),
        "old": routing_report(r10, xq, g10, ex10, is_old),
    }

    print(
        f"\nCLINC150 test ({len(test)} queries), new expert {new!r} ({len(is_new)} queries; {len(train_new)} "
        f"train texts), other 9 domains ({len(is_old)} queries). recall@10 at t experts searched vs exhaustive."
    )
    print(
        f"{'router':<38}{'new acc@1':>10}{'new r@10@1':>11}{'new r@10@2':>11}"
        f"{'old acc@1':>10}{'old r@10@1':>11}{'old r@10@2':>11}"
    )
    for name, r in results.items():
        n = r.get("new")
        cells = [f"{n['acc@1']:.4f}", f"{n['recall@10@1']:.4f}", f"{n['recall@10@2']:.4f}"] if n else ["-"] * 3
        o = r["old"]
        cells += [f"{o['acc@1']:.4f}", f"{o['recall@10@1']:.4f}", f"{o['recall@10@2']:.4f}"]
        print(f"{name:<38}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (10, 11, 11, 10, 11, 11))))
    fn, rn = results["add_expert + fine-tune"]["new"], results["full retrain, 10 experts"]["new"]
    fo, bo = results["add_expert + fine-tune"]["old"], results["9 experts (before)"]["old"]
    ro = results["full retrain, 10 experts"]["old"]
    print(
        "\nnew expert after add_expert + fine-tune vs full retrain: "
        f"acc@1 {100 * (fn['acc@1'] - rn['acc@1']):+.2f} points, "
        f"recall@10@2 {100 * (fn['recall@10@2'] - rn['recall@10@2']):+.2f} (goal: within 2 points)"
    )
    print(
        f"other experts' acc@1 after fine-tune: {100 * (fo['acc@1'] - bo['acc@1']):+.2f} points vs before the add "
        f"(goal: >= -0.5), {100 * (fo['acc@1'] - ro['acc@1']):+.2f} vs the full retrain"
    )
    print(
        f"add_expert: {results['after add_expert']['seconds']:.2f} s ({len(train_new)} texts, "
        f"embeddings cached); fine-tune: {ft.pairs} pairs "
        f"({ft.focus} new + {ft.replayed} replayed), {ft.steps} steps, "
        f"{ft.seconds:.2f} s wall / {ft.cpu_seconds:.2f} s CPU"
    )
    print(
        f"full training of the 10-expert router: {t10.seconds:.1f} s wall / {t10.cpu_seconds:.1f} s CPU"
        f"{' (cached: timed when it was trained)' if cached10 else ''}"
    )
    print(
        f"fine-tune / full training: {100 * ft.seconds / t10.seconds:.1f}% wall, "
        f"{100 * ft.cpu_seconds / t10.cpu_seconds:.1f}% CPU (goal: <= 10%)"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "results": results,
                    "fine_tune": asdict(ft),
                    "config": asdict(cfg),
                    "full_train_10": asdict(t10),
                    "full_train_9": asdict(t9),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
