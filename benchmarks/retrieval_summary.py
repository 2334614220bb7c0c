"""Side-by-side dev table of the retrieval benchmarks from benchmarks/retrieval_dev.sh's reports.

    python benchmarks/retrieval_summary.py reports/retrieval

For each dataset: the gate's row on all of dev (in-sample: training validated and calibrated on
those queries), its 2-fold cross-validated row (query-weighted mean over the held-out halves), the
best baseline by source acc@1 (from the all-of-dev report), exhaustive search and the oracle source.
"ECE floor" is the mean ECE a perfectly calibrated gate with the same confidences would show on this
many queries (metrics.ece_noise_floor): an ECE near it cannot be told from perfect calibration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_router.eval.retrieval import EXHAUSTIVE, ORACLE

KEYS = (
    "source_acc@1",
    "ndcg@10@1",
    "ndcg@10@2",
    "ndcg@10@adaptive",
    "sources@adaptive",
    "ndcg@10@1.5_sources",
    "ndcg@10@exhaustive",
    "ndcg@10@oracle",
    "ece",
    "ece_noise_floor",
)
GATE = "gate (ours)"


def cross_validated(reports: list[dict]) -> dict[str, float]:
    """Query-weighted mean of each key over the folds' held-out reports."""
    n = sum(r["queries"] for r in reports)
    return {k: sum(r[k] * r["queries"] for r in reports) / n for k in KEYS}


def best_baseline(report: dict) -> tuple[str, dict]:
    """The baseline with the best source acc@1 (not the gate, random, exhaustive or the oracle source)."""
    rows = {
        name: row
        for name, row in report["routers"].items()
        if name not in (GATE, "random", EXHAUSTIVE, ORACLE) and "source_acc@1" in row
    }
    name = max(rows, key=lambda n: rows[n]["source_acc@1"])
    return name, rows[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default="reports/retrieval", help="folder of <data>/ and <data>_fold{0,1}/")
    args = parser.parse_args()
    root = Path(args.root)
    print(
        "| data | rows | source acc@1 | nDCG@10 1 source | 2 sources | top-p (mean sources) | at 1.5 sources "
        "| exhaustive | oracle source | ECE (floor) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted(root.glob("*/report.json")):
        if "_fold" in path.parent.name:
            continue
        name = path.parent.name
        full = json.loads(path.read_text())
        folds = [json.loads(p.read_text()) for p in sorted(root.glob(f"{name}_fold*/report.json"))]
        rows = [(f"gate, all of dev ({full['queries']} q, in-sample)", {k: full[k] for k in KEYS})]
        if folds:
            rows.append((f"gate, {len(folds)}-fold cross-validated", cross_validated(folds)))
        for label, r in rows:
            print(
                f"| {name} | {label} | {r['source_acc@1']:.3f} | {r['ndcg@10@1']:.4f} | {r['ndcg@10@2']:.4f} | "
                f"{r['ndcg@10@adaptive']:.4f} ({r['sources@adaptive']:.2f}) | {r['ndcg@10@1.5_sources']:.4f} | "
                f"{r['ndcg@10@exhaustive']:.4f} | {r['ndcg@10@oracle']:.4f} | "
                f"{r['ece']:.3f} ({r['ece_noise_floor']:.3f}) |"
            )
        b, row = best_baseline(full)
        print(
            f"| {name} | best baseline: {b} | {row['source_acc@1']:.3f} | "
            f"{row['ndcg@10@1']:.4f} | {row['ndcg@10@2']:.4f} | "
            f"{row['ndcg@10@adaptive']:.4f} ({row['sources@adaptive']:.2f}) | {row['ndcg@10@1.5_sources']:.4f} | | | |"
        )


if __name__ == "__main__":
    main()
