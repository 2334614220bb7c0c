"""optimize_routing on CLINC150: what it tries, what it keeps, and whether validation gains hold on test.

    python benchmarks/lifecycle_optimize.py [--cache-dir reports/tmp/lifecycle_hybrid]

Two runs on the fully trained 10-domain router (cached; trained if missing), validation split
as the optimisation set, test split to check the result:
  trained     the router as trained
  skewed      the same router with +2.0 added to one expert's gate bias (an overloaded expert)
For each: every candidate with its before/after numbers on validation, whether it was kept,
the reported improvement, and recall@10 at 2 experts on test before and after.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
from lifecycle_common import CLINC, add_smoke_flag, apply_smoke, clinc, embedder, exact_top10, trained

from moe_router import lifecycle
from moe_router.embed.cache import default_cache_dir
from moe_router.metrics import load_stats, overlap_at_k, top_experts
from moe_router.routing.router import Router
from moe_router.train.finetune import FineTuneConfig, fine_tuner


def test_recall(router: Router, xq: np.ndarray) -> tuple[float, float]:
    """(recall@10 at 2 experts vs exhaustive, load max/mean at 2 experts) on the test queries."""
    top = top_experts(router.gate_probs(xq), 2)
    res = router.search_experts(xq, 10, top)
    return overlap_at_k(res.I, exact_top10(router, xq)), load_stats(top, router.num_experts)["max_over_mean"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(CLINC))
    p.add_argument("--cache-dir", default="reports/tmp/lifecycle_hybrid")
    p.add_argument("--skew-expert", default="banking")
    p.add_argument("--seed", type=int, default=0)
    add_smoke_flag(p)
    args = p.parse_args()
    apply_smoke(args)

    emb = embedder()
    ds = clinc(args.data)
    val, test = ds.split("val"), ds.split("test")
    path = Path(args.cache_dir) / "clinc150-10"
    trained(path, ds, emb, args.seed)
    xv, xt = emb.encode([r.text for r in val]), emb.encode([r.text for r in test])

    tune = FineTuneConfig(seed=args.seed, steps=5 if args.smoke else FineTuneConfig.steps)
    for name in ("trained", "skewed"):
        router = Router.load(path, cache_dir=default_cache_dir())
        router = router.fork(private_store=True)
        if name == "skewed":  # a gate that sends too much to one expert (derived from a copy, as gates are)
            gate = copy.deepcopy(router.gate)
            shift = np.zeros(router.num_experts)
            shift[router.expert_indices([args.skew_expert])[0]] = 2.0
            gate.shift_bias(shift)
            router.set_gate(gate)
        before = test_recall(router, xt)
        rep = lifecycle.optimize_routing(router, xv, top_experts_searched=2, fine_tune=fine_tuner(tune), seed=args.seed)
        after = test_recall(router, xt)
        print(f"\n{name}: {len(xv)} validation queries, top-2 experts searched")
        for a in rep.actions:
            print(
                f"  {a.kind:<9} {', '.join(a.experts)[:60]:<60} {'KEPT' if a.kept else 'rejected':<8} val recall@10 "
                f"{a.before.recall:.4f} -> {a.after.recall:.4f}, "
                f"scanned {a.before.scanned:.4f} -> {a.after.scanned:.4f}, "
                f"load max/mean {a.before.max_over_mean:.2f} -> {a.after.max_over_mean:.2f}  ({a.note})"
            )
        if not rep.actions:
            print("  no candidate: no expert over/under loaded, no pair confused above the threshold")
        print(
            f"  reported: rebalanced {rep.count('rebalance')}, merged {rep.count('merge')}, "
            f"split {rep.count('split')}, "
            f"improvement {100 * rep.improvement:+.2f} points of val recall@10"
        )
        print(
            f"  test recall@10@2 {before[0]:.4f} -> {after[0]:.4f}; "
            f"test load max/mean {before[1]:.2f} -> {after[1]:.2f}"
        )


if __name__ == "__main__":
    main()
