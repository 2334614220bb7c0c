"""Feedback fixes routing (issue 4, measurement 6): a simulated feedback stream on CLINC150.

    python benchmarks/lifecycle_feedback.py [--intent translate --wrong-domain utility]
                                            [--cache-dir reports/tmp/lifecycle_hybrid]

Two scenarios on the fully trained 10-domain router (cached in --cache-dir; trained if missing):
  A. a region routed wrong on purpose: the gate is fine-tuned to send one intent's training
     texts to a wrong domain (a regression), so that intent's test queries are mis-routed;
  B. the router's own mistakes: the 3 intents with the lowest acc@1 on the validation split.
The feedback stream is the validation split (3,000 queries, none of them in test): each query
is routed to its top-2 experts; the simulated user marks the first one positive if it is the
query's domain, negative otherwise, and when it was wrong but the second one is right, marks
that one positive too (Router.record_feedback, stored in SQLite). Then
adaptation.fine_tune_from_feedback. acc@1 is reported on the test queries of the region and on
all other test queries, before and after; plus the feedback stats and recommendations.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from lifecycle_common import CLINC, add_smoke_flag, apply_smoke, clinc, embedder, trained

from moe_router import lifecycle
from moe_router.embed.cache import default_cache_dir
from moe_router.routing.router import Router
from moe_router.train.finetune import FineTuneConfig, fine_tune_from_feedback, fine_tune_pairs


def acc1(router: Router, xq: np.ndarray, gold: np.ndarray) -> float:
    return float((router.gate_probs(xq).argmax(1) == gold).mean()) if len(xq) else float("nan")


def stream_feedback(router: Router, xq: np.ndarray, gold: np.ndarray) -> tuple[int, int]:
    """The simulated user judges the first expert shown; when it was wrong and the right one was
    shown second, the user also marks that one good. Returns (records, positive)."""
    records = positive = 0
    for x, g, routes in zip(xq, gold, router.route(xq, top_experts=2)):
        first, second = (router.expert_indices([r.expert])[0] for r in routes)
        router.record_feedback(x, routes[0].expert, first == g)
        records, positive = records + 1, positive + (first == g)
        if first != g and second == g:
            router.record_feedback(x, routes[1].expert, True)
            records, positive = records + 1, positive + 1
    return records, positive


def scenario(
    name: str,
    router: Router,
    region_test: np.ndarray,
    xq_test: np.ndarray,
    gold_test: np.ndarray,
    xq_val: np.ndarray,
    gold_val: np.ndarray,
    cfg: FineTuneConfig,
    before: dict[str, float],
) -> dict:
    rest = np.setdiff1d(np.arange(len(xq_test)), region_test)
    out = {"scenario": name, "region_queries": int(len(region_test)), "rest_queries": int(len(rest)), **before}
    out["region acc@1 before feedback"] = acc1(router, xq_test[region_test], gold_test[region_test])
    out["rest acc@1 before feedback"] = acc1(router, xq_test[rest], gold_test[rest])
    records, positive = stream_feedback(router, xq_val, gold_val)
    out["feedback records"], out["feedback positive"] = records, positive
    out["stats"] = [(s.expert, s.total, round(s.success_rate, 3)) for s in lifecycle.feedback_stats(router) if s.total]
    out["recommendations"] = [(r.expert, r.action, r.reason) for r in lifecycle.recommendations(router)]
    res = fine_tune_from_feedback(router, cfg)
    out["fine-tune"] = {"pairs": res.pairs, "steps": res.steps, "seconds": round(res.seconds, 2)}
    out["region acc@1 after feedback"] = acc1(router, xq_test[region_test], gold_test[region_test])
    out["rest acc@1 after feedback"] = acc1(router, xq_test[rest], gold_test[rest])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(CLINC))
    p.add_argument("--intent", default="translate", help="scenario A: the intent routed wrong on purpose")
    p.add_argument("--wrong-domain", default="utility", help="scenario A: where the regression sends it")
    p.add_argument("--worst", type=int, default=3, help="scenario B: how many of the worst intents form the region")
    p.add_argument("--cache-dir", default="reports/tmp/lifecycle_hybrid")
    p.add_argument("--steps", type=int, default=FineTuneConfig.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    add_smoke_flag(p)
    args = p.parse_args()
    apply_smoke(args)

    emb = embedder()
    ds = clinc(args.data)
    val, test, train = ds.split("val"), ds.split("test"), ds.split("train")
    path = Path(args.cache_dir) / "clinc150-10"
    trained(path, ds, emb, args.seed)
    xq_val, xq_test = emb.encode([r.text for r in val]), emb.encode([r.text for r in test])
    index = {d: i for i, d in enumerate(ds.experts)}
    gold_val = np.array([index[r.domain] for r in val])
    gold_test = np.array([index[r.domain] for r in test])
    label_val, label_test = np.array([r.label for r in val]), np.array([r.label for r in test])
    cfg = FineTuneConfig(steps=args.steps, seed=args.seed)
    results = []

    # A: a regression sends one intent to a wrong domain.
    router = Router.load(path, cache_dir=default_cache_dir())
    router = router.fork(private_store=True)  # keep the cached checkpoint's store clean
    region = np.flatnonzero(label_test == args.intent)
    if not len(region):
        raise SystemExit(f"--intent {args.intent!r} has no test queries")
    clean = {
        "region acc@1 clean router": acc1(router, xq_test[region], gold_test[region]),
        "rest acc@1 clean router": acc1(router, np.delete(xq_test, region, 0), np.delete(gold_test, region)),
    }
    bad = [r.text for r in train if r.label == args.intent]
    target = np.zeros((len(bad), router.num_experts), np.float32)
    target[:, router.expert_indices([args.wrong_domain])[0]] = 1.0
    # The regression: a fine-tune on those texts labelled with the wrong domain, 1:1 with replayed vectors.
    fine_tune_pairs(router, emb.encode(bad), target, FineTuneConfig(steps=args.steps, replay=1.0, seed=args.seed))
    results.append(
        scenario(
            f"A: intent {args.intent!r} ({ds.split('test')[region[0]].domain}) sent to "
            f"{args.wrong_domain!r} by a bad fine-tune",
            router,
            region,
            xq_test,
            gold_test,
            xq_val,
            gold_val,
            cfg,
            clean,
        )
    )

    # B: the clean router's own weakest intents (chosen on validation, measured on test).
    router = Router.load(path, cache_dir=default_cache_dir())
    router = router.fork(private_store=True)
    correct = router.gate_probs(xq_val).argmax(1) == gold_val
    per_intent = {lab: correct[label_val == lab].mean() for lab in np.unique(label_val)}
    worst = sorted(per_intent, key=per_intent.get)[: args.worst]
    region = np.flatnonzero(np.isin(label_test, worst))
    results.append(
        scenario(
            f"B: the {args.worst} intents with the lowest val acc@1: "
            + ", ".join(f"{w} ({per_intent[w]:.2f})" for w in worst),
            router,
            region,
            xq_test,
            gold_test,
            xq_val,
            gold_val,
            cfg,
            {},
        )
    )

    for r in results:
        print(f"\n{r['scenario']}")
        print(f"  test queries: region {r['region_queries']}, rest {r['rest_queries']}")
        for key in ("clean router", "before feedback", "after feedback"):
            if f"region acc@1 {key}" in r:
                print(f"  acc@1 {key:<16} region {r[f'region acc@1 {key}']:.4f}   rest {r[f'rest acc@1 {key}']:.4f}")
        print(
            f"  feedback stream: {r['feedback records']} records ({r['feedback positive']} positive) from "
            f"{len(xq_val)} validation queries; fine-tune {r['fine-tune']}"
        )
        print("  success rates: " + ", ".join(f"{e} {100 * s:.0f}% of {n}" for e, n, s in r["stats"]))
        print("  recommendations: " + ("; ".join(f"{e}: {a} ({why})" for e, a, why in r["recommendations"]) or "none"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "config": asdict(cfg)}, indent=2, default=str))


if __name__ == "__main__":
    main()
