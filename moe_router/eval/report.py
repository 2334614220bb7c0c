"""An evaluation report written out: report.json, table.md and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moe_router.eval import plots
from moe_router.eval.evaluate import FLAT, GATE
from moe_router.metrics import load_stats, top_experts
from moe_router.routing.router import Router


def markdown_table(report: dict[str, Any], searched: list[int], k: int) -> str:
    """One row per router: acc@1, acc@2, recall@k at each experts-searched, scanned, load, OOS AUROC."""
    cols = ["acc@1", "acc@2", *(f"recall@{k}@{t}" for t in searched), f"scanned@{searched[min(1, len(searched) - 1)]}",
            "load max/mean", "dead", "OOS AUROC"]
    lines = ["| router | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in report["routers"].items():
        cells = []
        for c in cols:
            if c == "load max/mean":
                v = row.get("load@1", {}).get("max_over_mean")
            elif c == "dead":
                v = row.get("load@1", {}).get("dead")
            elif c == "OOS AUROC":
                v = row.get("oos_auroc")
            else:
                v = row.get(c)
            cells.append("–" if v is None else (str(v) if isinstance(v, int) else f"{v:.3f}"))
        label = f"{name} *(scans everything)*" if row.get("scans_everything") and name != FLAT else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], out_dir: Path, searched: list[int], k: int, router: Router,
                  scores: dict[str, np.ndarray]) -> None:
    """report.json, table.md and PNG plots (recall curve, load per expert, reliability diagram) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    title = f"{report['dataset']} ({report['experts']} experts, {report['queries']} {report['split']} queries)"
    table = markdown_table(report, searched, k)
    speed = "\n".join(
        f"- batch {s['batch']}: routed {s['routed_qps']:.0f} q/s vs exhaustive {s['exhaustive_qps']:.0f} q/s "
        f"({s['speedup']:.2f}x); p50/p99 {s['routed_p50_ms']:.2f}/{s['routed_p99_ms']:.2f} ms vs "
        f"{s['exhaustive_p50_ms']:.2f}/{s['exhaustive_p99_ms']:.2f} ms; gate share {100 * s['gate_share']:.1f}%"
        for s in report["speed"].values()
    )
    cal = report["calibration"]
    extra = ""
    if "capacity" in report:
        c = report["capacity"]
        extra += (f"\nCapacity factor {c['factor']} at {c['experts_searched']} experts: max/mean load "
                  f"{c['max_over_mean']:.3f} (uncapped {c['max_over_mean_uncapped']:.3f}), recall@{k} "
                  f"{c[f'recall@{k}']:.4f} (uncapped {c[f'recall@{k}_uncapped']:.4f}).\n")
    if "out_of_scope" in report and "threshold" in report["out_of_scope"]:
        o = report["out_of_scope"]
        extra += (f"\nAbstention at the validation-chosen threshold {o['threshold']:.3f}: {100 * o['in_scope_kept']:.1f}% "
                  f"of in-scope test queries kept, {100 * o['oos_refused']:.1f}% of out-of-scope refused.\n")
    (out_dir / "table.md").write_text(
        f"### {title}\n\n{table}\n\nECE of the top-1 probability: {cal['calibrated']['ece']:.4f} at T = "
        f"{cal['temperature']:.3f} ({cal['uncalibrated (T=1)']['ece']:.4f} at T = 1).\n{extra}\nSpeed (same run):\n{speed}\n"
    )
    curves = {n: r for n, r in report["routers"].items() if not n.startswith("random")}
    plots.recall_curve(curves, searched, k, out_dir / "recall.png", title)
    shares = {n: load_stats(top_experts(s, 1), router.num_experts)["shares"]
              for n, s in scores.items() if n in (GATE, "centroid")}
    plots.load_bars(shares, router.expert_names, out_dir / "load.png", f"top-1 load: {title}")
    plots.reliability_diagram({n: cal[n]["bins"] for n in ("calibrated", "uncalibrated (T=1)")},
                              out_dir / "reliability.png", f"reliability: {report['dataset']}")

