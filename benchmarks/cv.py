"""Nested K-fold cross-validation on dev of the retrieval benchmarks: every query-time setting chosen without the fold.

    python benchmarks/cv.py --data classic stackexchange --folds 4 --out reports/cv
    python benchmarks/cv.py --data stackexchange --prototypes 128 512   # also the prototype count, by the same CV
    python benchmarks/cv.py --data classic --linear-weights 0 1   # also the linear head, by the same CV
    python benchmarks/cv.py --smoke   # seconds: two small sources, hashing embedder, one epoch (numbers mean nothing)

Dev's judged queries are dealt into K seeded folds per source (data.holdout_folds, BeirDataset). For
each outer fold f: train with the default config on the documents, the train split and the other
folds (they pick the epoch and fit the calibration); on those same other folds only (the inner
queries), fit the re-decision weight (decide_weight: the searched sources re-decided from their
hits, train.calibrate.fit_decide_weight) and choose the operating point of adaptive routing (top-k or
top-p, its cap max_experts, the merge's prior_weight, or top-p over the top two with re-decision):
within --budget mean sources the one with the highest nDCG@10, the widest of those within --tol of it
(eval.adaptive.safest_within); the earlier rule (the cheapest point reaching exhaustive search's
nDCG@10) and the best point are measured beside it. Then measure on fold f, which nothing has seen:
source acc@1, nDCG@10 at 1 source, at each rule's point (and its mean sources), exhaustive, oracle
source, ECE against its noise floor, and the configs' own defaults beside them. With --prototypes
and/or --linear-weights, each prototype count and linear-head weight (linear_weight: the gate times a
logistic regression) is trained per fold and the one with the best inner source acc@1 is the fold's;
only that one is measured on fold f.
Writes reports/cv/<data>.md and <data>.json. Test judgments are never read.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from cv_common import compose_cfg, write_reports
from hydra.utils import instantiate
from omegaconf import DictConfig

from moe_router.apps.train import train
from moe_router.data.beir import HELDOUT, BeirDataset
from moe_router.embed.cache import default_cache_dir
from moe_router.eval.adaptive import P_GRID, OperatingPoint, cheapest_at_least, safest_within
from moe_router.eval.baselines import GATE
from moe_router.eval.retrieval import evaluate_retrieval, gold_sources, labelled_queries
from moe_router.metrics import ece_noise_floor, expected_calibration_error
from moe_router.routing.router import Router
from moe_router.train.calibrate import fit_decide_weight

REPO = Path(__file__).resolve().parents[1]
PRIOR_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.5)  # merge weights tried: 0 = by score alone
MAX_EXPERTS = (2, 4)  # caps of top-p tried
DECIDE_EXPERTS = 2  # re-decision is tried among the gate's top two sources (top-p capped at 2)
BUDGET = 1.5  # the chosen point searches at most this many sources on average (on the inner queries)
TOL = 1e-3  # nDCG@10 differences under this are noise on the inner queries: the safer (wider) point wins
INNER = "dev"  # with holdout_folds, BeirDataset's 'dev' is dev without the held-out fold
OUTER_KEYS = (
    "source_acc@1",
    "ndcg@10@1",
    "ndcg@10@chosen",
    "sources@chosen",
    "ndcg@10@cheapest",
    "sources@cheapest",
    "ndcg@10@best",
    "sources@best",
    "ndcg@10@defaults",
    "sources@defaults",
    "ndcg@10@exhaustive",
    "ndcg@10@oracle",
    "ece",
    "ece_floor_q90",
)


def operating_points(
    router: Router, data: BeirDataset, split: str, weights: tuple[float, ...], caps: tuple[int, ...]
) -> tuple[list[OperatingPoint], dict[str, Any], float | None]:
    """nDCG@10 of every top-k and top-p setting at each prior weight and cap on `split`, and of top-p with
    re-decision at the decide_weight fitted on `split` (None: nothing to fit it on); one report of it."""
    E = router.num_experts
    points, report = [], {}
    for w in weights:
        router.prior_weight = w
        for cap in caps:
            report, _ = evaluate_retrieval(
                router, data, split, max_experts=cap, p_grid=P_GRID, top_k=range(1, E + 1), baselines=()
            )
            for pt in report["frontier"][GATE]:
                if pt["setting"].startswith("top-") and cap != caps[0]:
                    continue  # top-k ignores the cap: counted once
                points.append(OperatingPoint(pt["setting"], min(cap, E), w, pt["experts"], pt["quality"]))
    xq, gold = labelled_queries(router, data, split)
    beta = fit_decide_weight(router, xq, gold, DECIDE_EXPERTS)
    if beta:  # re-deciding keeps one source's hits: the merge's prior weight plays no part
        before = router.decide_weight
        router.prior_weight, router.decide_weight = 0.0, beta
        decided, _ = evaluate_retrieval(
            router, data, split, max_experts=DECIDE_EXPERTS, p_grid=P_GRID, top_k=(1,), baselines=()
        )
        router.decide_weight = before
        for pt in decided["frontier"][GATE]:
            if pt["setting"].startswith("p="):
                points.append(OperatingPoint(pt["setting"], DECIDE_EXPERTS, 0.0, pt["experts"], pt["quality"], beta))
    return points, report, beta


def at_point(
    router: Router, data: BeirDataset, split: str, point: OperatingPoint
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The retrieval report of `split` with the router set to `point`; its frontier holds the point's row."""
    E = router.num_experts
    before = router.decide_weight
    router.prior_weight, router.decide_weight = point.prior_weight, point.decide_weight
    try:
        return evaluate_retrieval(
            router, data, split, max_experts=point.max_experts, p_grid=P_GRID, top_k=range(1, E + 1), baselines=()
        )
    finally:
        router.decide_weight = before


def frontier_row(report: dict[str, Any], setting: str) -> dict[str, Any]:
    return next(p for p in report["frontier"][GATE] if p["setting"] == setting)


def run_fold(args: argparse.Namespace, data: str, fold: int, work: Path, eval_cfg: DictConfig) -> dict[str, Any]:
    """Train per candidate on the other folds, choose on them, measure on `fold`."""
    base = [
        f"data={data}",
        f"data.holdout_folds={args.folds}",
        f"data.holdout_fold={fold}",
        f"datasets_dir={args.datasets_dir}",
        "trainer.enable_progress_bar=false",
        *args.overrides,
    ]
    counts = [[f"model.prototypes_per_expert={n}"] for n in args.prototypes] or [[]]
    linear = [[f"linear_weight={w:g}"] for w in args.linear_weights] or [[]]
    candidates = [c + w for c in counts for w in linear]
    trained = []
    for extra in candidates:
        name = "_".join(x.split("=")[-1] for x in extra)
        out = (args.reuse or work) / f"{data}_{fold}_{name}"
        cfg = compose_cfg("train", [*base, f"out={out}", f"log_dir={work}/logs_{data}_{fold}_{name}", *extra])
        router = Router.load(out, cache_dir=cfg.cache_dir or default_cache_dir()) if args.reuse else train(cfg).router
        dataset = instantiate(cfg.data)
        if cfg.prior_weight != "auto":  # as training sets it: a reused router may have been trained before a change
            router.prior_weight = float(cfg.prior_weight)
        default_weight = router.prior_weight
        points, inner, beta = operating_points(router, dataset, INNER, args.prior_weights, args.max_experts)
        chosen = safest_within(points, args.budget, args.tol)
        cheapest = cheapest_at_least(points, inner["ndcg@10@exhaustive"])  # the earlier rule, beside it
        best = max(points, key=lambda p: (p.quality, -p.experts))  # the other rule: best on the inner folds
        trained.append((extra, cfg, router, dataset, default_weight, chosen, cheapest, best, inner, beta))
        print(
            f"  {data} fold {fold} {' '.join(extra) or 'defaults'}: inner acc@1 {inner['source_acc@1']:.3f}, "
            f"decide_weight {beta}, chosen {chosen}"
        )
    extra, cfg, router, dataset, default_weight, chosen, cheapest, best, inner, beta = max(
        trained, key=lambda t: t[8]["source_acc@1"]
    )

    outer, scores = at_point(router, dataset, HELDOUT, chosen)
    row = frontier_row(outer, chosen.setting)
    cheapest_row = frontier_row(at_point(router, dataset, HELDOUT, cheapest)[0], cheapest.setting)
    best_row = frontier_row(at_point(router, dataset, HELDOUT, best)[0], best.setting)
    router.prior_weight = default_weight  # the configs' defaults, measured on the same fold
    defaults, _ = evaluate_retrieval(
        router, dataset, HELDOUT, top_p=eval_cfg.top_p, max_experts=eval_cfg.max_experts, baselines=()
    )
    gold = gold_sources(router, dataset, HELDOUT)
    probs = scores[GATE]
    calibrated = outer["calibration"]["calibrated"]
    return {
        "fold": fold,
        "queries": outer["queries"],
        "inner_queries": inner["queries"],
        "candidate": " ".join(extra) or "defaults",
        "chosen": vars(chosen),
        "cheapest": vars(cheapest),
        "best": vars(best),
        "fitted_decide_weight": beta,
        "inner_ndcg@10@exhaustive": inner["ndcg@10@exhaustive"],
        "default_prior_weight": default_weight,
        "source_acc@1": outer["source_acc@1"],
        "ndcg@10@1": outer["ndcg@10@1"],
        "ndcg@10@chosen": row["quality"],
        "sources@chosen": row["experts"],
        "ndcg@10@cheapest": cheapest_row["quality"],
        "sources@cheapest": cheapest_row["experts"],
        "ndcg@10@best": best_row["quality"],
        "sources@best": best_row["experts"],
        "ndcg@10@defaults": defaults["ndcg@10@adaptive"],
        "sources@defaults": defaults["sources@adaptive"],
        "ndcg@10@exhaustive": outer["ndcg@10@exhaustive"],
        "ndcg@10@oracle": outer["ndcg@10@oracle"],
        "ece": calibrated["ece"],
        "ece_floor_q90": calibrated["ece_noise_floor_q90"],
        "confidence": probs.max(axis=1).tolist(),
        "correct": (probs.argmax(axis=1) == gold).tolist(),
    }


def summarise(folds: list[dict[str, Any]], draws: int) -> dict[str, Any]:
    """Mean and sd over folds; how often the chosen point held exhaustive's nDCG; ECE pooled over every fold."""
    out: dict[str, Any] = {
        k: {
            "mean": float(np.mean([f[k] for f in folds])),
            "sd": float(np.std([f[k] for f in folds], ddof=1)) if len(folds) > 1 else 0.0,
        }
        for k in OUTER_KEYS
    }
    out["held_exhaustive"] = sum(f["ndcg@10@chosen"] >= f["ndcg@10@exhaustive"] for f in folds)
    out["cheapest_held_exhaustive"] = sum(f["ndcg@10@cheapest"] >= f["ndcg@10@exhaustive"] for f in folds)
    out["best_held_exhaustive"] = sum(f["ndcg@10@best"] >= f["ndcg@10@exhaustive"] for f in folds)
    out["defaults_held_exhaustive"] = sum(f["ndcg@10@defaults"] >= f["ndcg@10@exhaustive"] for f in folds)
    conf = np.concatenate([f["confidence"] for f in folds])
    correct = np.concatenate([f["correct"] for f in folds])
    floor = ece_noise_floor(conf, draws=draws)
    out["pooled"] = {
        "queries": len(conf),
        "source_acc@1": float(correct.mean()),
        "ece": expected_calibration_error(conf, correct),
        "ece_floor_mean": floor.mean,
        "ece_floor_q90": floor.q90,
    }
    return out


def markdown(data: str, args: argparse.Namespace, folds: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    head = "| fold | queries | " + " | ".join(OUTER_KEYS) + " |"
    lines = [
        f"# {data}: {args.folds}-fold nested cross-validation on dev",
        "",
        "Written by `python benchmarks/cv.py --data "
        + data
        + f" --folds {args.folds}"
        + (f" --prototypes {' '.join(map(str, args.prototypes))}" if args.prototypes else "")
        + (f" --linear-weights {' '.join(f'{w:g}' for w in args.linear_weights)}" if args.linear_weights else "")
        + "`. Each fold is measured by a router trained and tuned without it (see the script's docstring). "
        f"`chosen`: within {args.budget:g} mean sources on the other folds, the highest nDCG@10 there; of the "
        f"points within {args.tol:g} of it, the one searching most (the safer when the folds cannot tell); "
        "`cheapest`: the cheapest point whose nDCG@10 on the other folds reached exhaustive's there (the earlier "
        "rule); `best`: the point with the highest nDCG@10 there (ties: fewer sources); "
        "`defaults`: the configs' top_p / max_experts / prior_weight on the same fold. `ece_floor_q90`: the "
        "90th percentile of the ECE of a perfectly calibrated gate with the same confidences on as many queries.",
        "",
        head,
        "|" + "---|" * (len(OUTER_KEYS) + 2),
    ]
    for f in folds:
        lines.append(f"| {f['fold']} | {f['queries']} | " + " | ".join(f"{f[k]:.3f}" for k in OUTER_KEYS) + " |")
    lines.append(
        "| **mean ± sd** | "
        + str(sum(f["queries"] for f in folds))
        + " | "
        + " | ".join(f"**{summary[k]['mean']:.3f}** ± {summary[k]['sd']:.3f}" for k in OUTER_KEYS)
        + " |"
    )
    p = summary["pooled"]
    lines += [
        "",
        f"Chosen point held exhaustive's nDCG@10 on the held-out fold in **{summary['held_exhaustive']} of "
        f"{len(folds)}** folds (`cheapest`: {summary['cheapest_held_exhaustive']} of {len(folds)}; `best`, "
        f"the point with the highest nDCG@10 on the other folds: "
        f"{summary['best_held_exhaustive']} of {len(folds)}; the configs' defaults: "
        f"{summary['defaults_held_exhaustive']} of {len(folds)}).",
        "",
        f"Pooled over the folds ({p['queries']} queries, each scored by a router that never saw it): source acc@1 "
        f"{p['source_acc@1']:.3f}, ECE {p['ece']:.4f} against a noise floor of {p['ece_floor_mean']:.4f} "
        f"(mean) / **{p['ece_floor_q90']:.4f}** (90th percentile): "
        + ("within the floor." if p["ece"] <= p["ece_floor_q90"] else "**above the floor**."),
        "",
        "## Settings chosen per fold (on the other folds only)",
        "",
        "| fold | rule | trained with | setting | max_experts | prior_weight | decide_weight | inner mean sources "
        "| inner nDCG@10 | inner exhaustive | configs' prior_weight |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in folds:
        for rule in ("chosen", "cheapest", "best"):
            c = f[rule]
            lines.append(
                f"| {f['fold']} | {rule} | {f['candidate']} | {c['setting']} | {c['max_experts']} | "
                f"{c['prior_weight']:g} | {c.get('decide_weight', 0.0):.1f} | {c['experts']:.2f} | "
                f"{c['quality']:.3f} | {f['inner_ndcg@10@exhaustive']:.3f} | {f['default_prior_weight']:g} |"
            )
    lines += [
        "",
        "prior_weight matters only where more than one source is searched (at top-1 every weight ties; the "
        "first of the grid is listed). max_experts matters only for top-p. decide_weight > 0: the query's "
        "searched sources are re-decided from their hits (Router.decide_weight, index.merge.redecide) at the "
        "weight fitted on the other folds' judged queries (train.calibrate.fit_decide_weight); 0: merged. "
        "Fitted per fold: "
        + ", ".join(
            "none" if f.get("fitted_decide_weight") is None else f"{f['fitted_decide_weight']:.1f}" for f in folds
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["classic", "stackexchange"], help="retrieval configs (configs/data)")
    p.add_argument("--folds", type=int, default=4, help="K: folds of dev's judged queries")
    p.add_argument("--prototypes", type=int, nargs="*", default=[], help="prototype counts per source to choose from")
    p.add_argument(
        "--linear-weights", type=float, nargs="*", default=[], help="linear-head weights to choose from (0 = none)"
    )
    p.add_argument("--prior-weights", type=float, nargs="+", default=list(PRIOR_WEIGHTS))
    p.add_argument("--max-experts", type=int, nargs="+", default=list(MAX_EXPERTS))
    p.add_argument("--budget", type=float, default=BUDGET, help="most mean sources the chosen point may search")
    p.add_argument("--tol", type=float, default=TOL, help="inner nDCG@10 differences treated as ties")
    p.add_argument("--datasets-dir", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--out", type=Path, default=REPO / "reports" / "cv")
    p.add_argument("--reuse", type=Path, default=None, help="load the fold routers an earlier run saved here")
    p.add_argument("--draws", type=int, default=2000, help="simulated calibrated outcome sets behind the ECE floor")
    p.add_argument("--smoke", action="store_true", help="two tiny classic sources, hashing embedder, 2 folds, 1 epoch")
    args = p.parse_args()
    args.overrides = []
    args.prior_weights, args.max_experts = tuple(args.prior_weights), tuple(args.max_experts)
    if args.folds < 2:
        p.error(f"--folds must be at least 2, got {args.folds}")
    work = Path(tempfile.mkdtemp(prefix="cv-"))
    print(f"Fold routers: {work}/ (rerun with --reuse {work} to re-evaluate without training)")
    if args.smoke:
        args.data, args.folds, args.draws = ["classic"], 2, 50
        args.prior_weights, args.max_experts = (0.0, 0.1), (2,)
        args.out = work / "reports"
        args.overrides = [
            "data.sources=[adi,med]",
            "embedder=hashing",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            f"cache_dir={work}/cache",
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        eval_cfg = compose_cfg("eval", [f"data={data}"])  # the defaults: the dataset's cv_chosen_eval point, if any
        write_reports(
            args.out,
            data,
            args.folds,
            lambda f, data=data, eval_cfg=eval_cfg: run_fold(args, data, f, work, eval_cfg),
            lambda folds: summarise(folds, args.draws),
            lambda folds, summary, data=data: markdown(data, args, folds, summary),
        )
    print(f"Reports: {args.out}/")


if __name__ == "__main__":
    main()
