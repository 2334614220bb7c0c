"""Nested K-fold cross-validation on the intent sets' validation rows: the gate against logistic regression.

    python benchmarks/cv_intents.py --data stackoverflow20 banking77 clinc150 --folds 4 --out reports/cv
    python benchmarks/cv_intents.py --data stackoverflow20 --label-weights 0.5 1.0 --linear-weights 0 1
    python benchmarks/cv_intents.py --data stackoverflow20 --train partition=16 '~cv_chosen' \
        --name stackoverflow20_kmeans16   # another layout: 16 k-means shards, without the data's cv_chosen file
    python benchmarks/cv_intents.py --smoke   # seconds: demo data, hashing embedder, one epoch (numbers mean nothing)

The validation rows (banking77: the 10% of train carved out, seed 0) are dealt into K seeded folds per
expert (data.holdout_folds, load_dataset). For each outer fold f and each candidate pair of the
training target's label weight (targets.label_weight: the share of the one-hot expert label in a
stored vector's target, the rest its exact neighbours' experts) and the linear-head weight
(linear_weight: 0 = the gate alone, w > 0 = the gate times a logistic regression's probabilities to
the power w, served as one gate), a router is trained on train with the other folds picking the epoch,
weighing the linear head and fitting the calibration; the candidate with the best inner score
(acc@1 + recall@10 at 2 experts, on those other folds) is the fold's choice. Only then is fold f
measured, for the chosen router and every baseline that does not scan everything (centroid,
multi-prototype, RAGRoute style, ReDDE style, FAISS IVF and the logistic regression, whose L2 penalty
is cross-validated on train and whose temperature is fitted on the same other folds): acc@1,
recall@10@2, ECE against its noise floor. Every candidate is also measured on fold f (a fixed setting,
for comparison; not a choice). Writes reports/cv/<data>.md and <data>.json. Test rows are never read.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from cv_common import compose_cfg, write_reports
from hydra.utils import instantiate

from moe_router.apps.train import train
from moe_router.data.datasets import HELDOUT
from moe_router.eval.baselines import GATE, LogisticRegressionRouter
from moe_router.eval.intents import IVF, evaluate_intents, split_gold
from moe_router.metrics import ece_noise_floor, expected_calibration_error

REPO = Path(__file__).resolve().parents[1]
LABEL_WEIGHTS = (0.5, 0.75, 1.0)  # candidates for targets.label_weight (configs/train.yaml's default: 0.5)
LINEAR_WEIGHTS = (0.0, 1.0)  # candidates for linear_weight: no linear head | the gate x the logistic regression
NON_SCANNING = ("centroid", "multi_prototype", "ragroute", "redde", "logreg")  # + FAISS IVF, always measured
LOGREG = LogisticRegressionRouter.name
INNER = "val"  # with holdout_folds, 'val' is the validation rows without the held-out fold
RECALL = "recall@10@2"


def candidates(args: argparse.Namespace) -> list[tuple[float, float]]:
    """Every (targets.label_weight, linear_weight) pair tried."""
    return [(w, lin) for lin in args.linear_weights for w in args.label_weights]


def label(candidate: tuple[float, float]) -> str:
    return f"label_weight {candidate[0]:g}, linear_weight {candidate[1]:g}"


def score(report: dict[str, Any]) -> float:
    """The inner selection score: acc@1 + recall@10 at 2 experts (both goals of the gate count)."""
    return report["acc@1"] + report[RECALL]


def quick(router: Any, dataset: Any, split: str, baselines: tuple[str, ...] = ()) -> dict[str, Any]:
    return evaluate_intents(router, dataset, split, baselines=baselines, capacity_factor=None, speed_batches=())[0]


def best_other(routers: dict[str, dict[str, Any]], metric: str, kmeans: bool = False) -> tuple[str, float]:
    """The best router on `metric` among those that do not scan everything, the gate and the logreg left out.

    With k-means experts (`kmeans`) the gold expert is the nearest centroid's, so the centroid router's
    acc@1 is 1 by definition: it is left out of acc@1 (benchmarks/summary.py does the same).
    """
    rows = [
        (name, r[metric])
        for name, r in routers.items()
        if name not in (GATE, LOGREG)
        and not r["scans_everything"]
        and metric in r
        and not (kmeans and metric == "acc@1" and name == "centroid")
    ]
    return max(rows, key=lambda t: t[1])


def run_fold(args: argparse.Namespace, data: str, fold: int, work: Path) -> dict[str, Any]:
    """Train each candidate without fold `fold`, choose on the other folds, measure on `fold`."""
    base = [
        f"data={data}",
        f"data.holdout_folds={args.folds}",
        f"data.holdout_fold={fold}",
        f"datasets_dir={args.datasets_dir}",
        "trainer.enable_progress_bar=false",
        *args.overrides,
    ]
    trained = []
    for w, lin in candidates(args):
        name = f"{data}_{fold}_{w}_{lin}"
        cfg = compose_cfg(
            "train",
            [
                *base,
                f"targets.label_weight={w}",
                f"linear_weight={lin}",
                f"out={work}/{name}",
                f"log_dir={work}/logs/{name}",
            ],
        )
        router = train(cfg).router
        dataset = instantiate(cfg.data)
        inner = quick(router, dataset, INNER)
        trained.append(((w, lin), router, dataset, inner))
        print(f"  {data} fold {fold} {label((w, lin))}: inner acc@1 {inner['acc@1']:.3f}, {RECALL} {inner[RECALL]:.3f}")
    first = (args.label_weights[0], args.linear_weights[0])
    # Ties go to the candidate nearest the first one (the configs' default): no change without a reason.
    chosen = max(trained, key=lambda t: (score(t[3]), -abs(t[0][0] - first[0]), -abs(t[0][1] - first[1])))
    w, router, dataset, inner = chosen
    outer, scores = evaluate_intents(
        router, dataset, HELDOUT, baselines=NON_SCANNING, capacity_factor=None, speed_batches=()
    )
    routers = outer["routers"]
    gold = split_gold(router, dataset, HELDOUT)  # k-means shards: the nearest centroid's
    probs = scores[GATE]
    kmeans = bool(outer.get("partition"))
    other_acc, other_recall = best_other(routers, "acc@1", kmeans), best_other(routers, RECALL)
    fixed = {label(c): outer if c == w else quick(r, d, HELDOUT) for c, r, d, _ in trained}
    calibrated = outer["calibration"]["calibrated"]
    return {
        "fold": fold,
        "queries": outer["queries"],
        "inner_queries": inner["queries"],
        "label_weight": w[0],
        "linear_weight": w[1],
        "chosen": label(w),
        "inner": {label(c): {"acc@1": i["acc@1"], RECALL: i[RECALL]} for c, _, _, i in trained},
        "acc@1": outer["acc@1"],
        RECALL: outer[RECALL],
        "logreg_acc@1": routers[LOGREG]["acc@1"],
        f"logreg_{RECALL}": routers[LOGREG][RECALL],
        "best_other_acc@1": other_acc[1],
        "best_other_acc@1_name": other_acc[0],
        f"best_other_{RECALL}": other_recall[1],
        f"best_other_{RECALL}_name": other_recall[0],
        f"ivf_{RECALL}": routers[IVF][RECALL],
        "ece": calibrated["ece"],
        "ece_floor_q90": calibrated["ece_noise_floor_q90"],
        "logreg_ece": routers[LOGREG]["ece"],
        "fixed": {c: {"acc@1": r["acc@1"], RECALL: r[RECALL], "ece": r["ece"]} for c, r in fixed.items()},
        "confidence": probs.max(axis=1)[gold >= 0].tolist(),
        "correct": (probs.argmax(axis=1) == gold)[gold >= 0].tolist(),
    }


KEYS = (
    "acc@1",
    "logreg_acc@1",
    "best_other_acc@1",
    RECALL,
    f"logreg_{RECALL}",
    f"best_other_{RECALL}",
    "ece",
    "ece_floor_q90",
    "logreg_ece",
)


def summarise(folds: list[dict[str, Any]], draws: int) -> dict[str, Any]:
    """Query-weighted means over the folds (every query scored once, by a router that never saw it) and fold sd."""
    n = np.array([f["queries"] for f in folds], dtype=np.float64)
    out: dict[str, Any] = {
        k: {
            "mean": float(np.average([f[k] for f in folds], weights=n)),
            "sd": float(np.std([f[k] for f in folds], ddof=1)) if len(folds) > 1 else 0.0,
        }
        for k in KEYS
    }
    for c in folds[0]["fixed"]:
        out[f"fixed {c}"] = {
            m: float(np.average([f["fixed"][c][m] for f in folds], weights=n)) for m in ("acc@1", RECALL, "ece")
        }
    out["gate_beats_logreg_acc@1"] = sum(f["acc@1"] > f["logreg_acc@1"] for f in folds)
    out["gate_at_least_best_other_recall"] = sum(f[RECALL] >= f[f"best_other_{RECALL}"] for f in folds)
    conf = np.concatenate([f["confidence"] for f in folds])
    correct = np.concatenate([f["correct"] for f in folds]).astype(bool)
    floor = ece_noise_floor(conf, draws=draws)
    out["pooled"] = {
        "queries": len(conf),
        "acc@1": float(correct.mean()),
        "ece": expected_calibration_error(conf, correct),
        "ece_floor_mean": floor.mean,
        "ece_floor_q90": floor.q90,
    }
    return out


def markdown(data: str, args: argparse.Namespace, folds: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    weights = " ".join(map(str, args.label_weights))
    linear = " ".join(map(str, args.linear_weights))
    lines = [
        f"# {args.name or data}: {args.folds}-fold nested cross-validation on the validation rows",
        "",
        f"Written by `python benchmarks/cv_intents.py --data {data} --folds {args.folds} --label-weights {weights} "
        f"--linear-weights {linear}"
        + (f" --train {' '.join(args.train)} --name {args.name}" if args.train or args.name else "")
        + "`. "
        "Each fold is measured by routers trained and tuned without it (see the script's docstring): the gate with "
        "the label weight and linear-head weight its other folds chose, the logistic regression and the other "
        "routers that do not scan "
        "everything (best of centroid, multi-prototype, RAGRoute style, ReDDE style; for recall also FAISS IVF). "
        "`ece_floor_q90`: the 90th percentile of the ECE a perfectly calibrated gate with the same confidences "
        "shows on as many queries.",
        "",
        "| fold | queries | chosen label_weight | chosen linear_weight | " + " | ".join(KEYS) + " |",
        "|" + "---|" * (len(KEYS) + 4),
    ]
    for f in folds:
        lines.append(
            f"| {f['fold']} | {f['queries']} | {f['label_weight']:g} | {f['linear_weight']:g} | "
            + " | ".join(f"{f[k]:.3f}" for k in KEYS)
            + " |"
        )
    lines.append(
        f"| **all (query-weighted) ± fold sd** | {sum(f['queries'] for f in folds)} | | | "
        + " | ".join(f"**{summary[k]['mean']:.3f}** ± {summary[k]['sd']:.3f}" for k in KEYS)
        + " |"
    )
    p = summary["pooled"]
    k = len(folds)
    lines += [
        "",
        f"The gate's acc@1 is above the logistic regression's in **{summary['gate_beats_logreg_acc@1']} of {k}** "
        f"folds; its {RECALL} at or above the best non-scanning baseline's in "
        f"**{summary['gate_at_least_best_other_recall']} of {k}**.",
        "",
        f"Pooled over the folds ({p['queries']} queries): acc@1 {p['acc@1']:.3f}, ECE {p['ece']:.4f} against a "
        f"noise floor of {p['ece_floor_mean']:.4f} (mean) / **{p['ece_floor_q90']:.4f}** (90th percentile): "
        + ("within the floor." if p["ece"] <= p["ece_floor_q90"] else "**above the floor**."),
        "",
        "## Every candidate at a fixed setting, on the same held-out folds (a comparison, not a choice)",
        "",
        f"| candidate | acc@1 | {RECALL} | ECE |",
        "|---|---|---|---|",
    ]
    for c in folds[0]["fixed"]:
        r = summary[f"fixed {c}"]
        lines.append(f"| {c} | {r['acc@1']:.3f} | {r[RECALL]:.3f} | {r['ece']:.3f} |")
    lines += [
        "",
        "## Inner scores per fold (on the other folds only; the choice maximises acc@1 + recall@10@2)",
        "",
        "| fold | candidate | inner acc@1 | inner " + RECALL + " |",
        "|---|---|---|---|",
    ]
    for f in folds:
        for c, r in f["inner"].items():
            mark = " (chosen)" if c == f["chosen"] else ""
            lines.append(f"| {f['fold']} | {c}{mark} | {r['acc@1']:.3f} | {r[RECALL]:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["stackoverflow20", "banking77", "clinc150"], help="configs/data")
    p.add_argument("--folds", type=int, default=4, help="K: folds of the validation rows")
    p.add_argument("--label-weights", type=float, nargs="+", default=list(LABEL_WEIGHTS), help="candidates")
    p.add_argument("--linear-weights", type=float, nargs="+", default=list(LINEAR_WEIGHTS), help="candidates")
    p.add_argument("--datasets-dir", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--out", type=Path, default=REPO / "reports" / "cv")
    p.add_argument("--draws", type=int, default=2000, help="simulated calibrated outcome sets behind the ECE floor")
    p.add_argument(
        "--train", nargs="+", default=[], metavar="OVERRIDE", help="training overrides for every candidate: a layout"
    )
    p.add_argument("--name", default=None, help="the reports' name (default: the data's); one --data only")
    p.add_argument("--smoke", action="store_true", help="the demo data, hashing embedder, 2 folds, 1 epoch")
    args = p.parse_args()
    args.overrides = list(args.train)
    if args.name and len(args.data) != 1:
        p.error(f"--name names one data's reports; got {len(args.data)} --data")
    if args.folds < 2:
        p.error(f"--folds must be at least 2, got {args.folds}")
    if any(not 0.0 <= w <= 1.0 for w in args.label_weights):
        p.error(f"--label-weights must lie in [0, 1], got {args.label_weights}")
    if any(not w >= 0 for w in args.linear_weights):
        p.error(f"--linear-weights must be >= 0, got {args.linear_weights}")
    work = Path(tempfile.mkdtemp(prefix="cv-intents-"))
    if args.smoke:
        args.data, args.folds, args.draws, args.label_weights, args.linear_weights = (
            ["demo"],
            2,
            50,
            [0.5, 1.0],
            [0.0, 1.0],
        )
        args.out = work / "reports"
        args.overrides += ["embedder=hashing", "trainer.max_epochs=1", "trainer.accelerator=cpu", f"cache_dir={work}"]
    args.out.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        write_reports(
            args.out,
            args.name or data,
            args.folds,
            lambda f, data=data: run_fold(args, data, f, work),
            lambda folds: summarise(folds, args.draws),
            lambda folds, summary, data=data: markdown(data, args, folds, summary),
        )
    print(f"Reports: {args.out}/")


if __name__ == "__main__":
    main()
