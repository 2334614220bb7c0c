"""The README's summary table, from the reports that benchmarks/quality.sh wrote.

    python benchmarks/summary.py                 # every reports/<setting>/report.json
    python benchmarks/summary.py clinc150 banking77

Per setting: the gate against the best other router for acc@1 (any router, including those that
scan everything; for k-means experts the centroid router is right by definition and is left out),
against the best cheap router for recall@10 at 1 and 2 experts (centroid, multi-prototype, FAISS
IVF: their cost does not grow with the corpus), the recall ceiling (kNN vote), dead experts (top-1
load) of the gate and of the ceiling, and the gate's ECE after temperature scaling.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPORTS = Path(__file__).resolve().parents[1] / "reports"
GATE, CEILING = "gate (ours)", "kNN vote (k=10, oracle ceiling)"
CHEAP = ("centroid", "multi-prototype (64/expert)", "FAISS IVF-Flat (own k-means, nprobe = experts)")
COLUMNS = [
    "setting",
    "experts",
    "gate acc@1",
    "best other acc@1",
    "gate r@10@1",
    "best cheap @1",
    "gate r@10@2",
    "best cheap @2",
    "ceiling @2",
    "dead (gate / ceiling)",
    "ECE",
]


def row(name: str, report: dict) -> list[str]:
    routers = report["routers"]
    gate, ceiling = routers[GATE], routers[CEILING]
    kmeans = bool(report.get("partition"))  # k-means experts: the gold expert is the nearest centroid's
    others = [r["acc@1"] for n, r in routers.items() if n != GATE and "acc@1" in r and not (kmeans and n == "centroid")]

    def best_cheap(t: int) -> float:
        return max(routers[n][f"recall@10@{t}"] for n in CHEAP if n in routers)

    return [
        name,
        str(report["experts"]),
        f"{gate['acc@1']:.3f}",
        f"{max(others):.3f}",
        f"{gate['recall@10@1']:.3f}",
        f"{best_cheap(1):.3f}",
        f"{gate['recall@10@2']:.3f}",
        f"{best_cheap(2):.3f}",
        f"{ceiling['recall@10@2']:.3f}",
        f"{gate['load@1']['dead']} / {ceiling['load@1']['dead']}",
        f"{report['calibration']['calibrated']['ece']:.3f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="*", help="report directories under reports/ (default: all)")
    args = parser.parse_args()
    names = args.settings or sorted(p.parent.name for p in REPORTS.glob("*/report.json"))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for name in names:
        lines.append("| " + " | ".join(row(name, json.loads((REPORTS / name / "report.json").read_text()))) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
