"""An evaluation report written out: report.json, table.md and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from moe_router.eval import plots
from moe_router.eval.baselines import GATE
from moe_router.eval.intents import FLAT
from moe_router.metrics import load_stats, top_experts
from moe_router.routing.router import Router


def markdown_table(report: dict[str, Any], searched: list[int], k: int) -> str:
    """One row per router: acc@1, acc@2, recall@k at each experts-searched, scanned, load, OOS AUROC."""
    cols = [
        "acc@1",
        "acc@2",
        *(f"recall@{k}@{t}" for t in searched),
        f"scanned@{searched[min(1, len(searched) - 1)]}",
        f"recall@{k}@adaptive",
        "experts@adaptive",
        f"recall@{k}@1.5_experts",
        f"recall@{k}@top2_scanned",
        "load max/mean",
        "dead",
        "ECE",
        "OOS AUROC",
    ]
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
            elif c == "ECE":
                v = row.get("ece")
            else:
                v = row.get(c)
            cells.append("–" if v is None else (str(v) if isinstance(v, int) else f"{v:.3f}"))
        label = f"{name} *(scans everything)*" if row.get("scans_everything") and name != FLAT else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_table(curves: dict[str, list[dict[str, Any]]], quality: str) -> str:
    """One row per router, one column per setting (top-k, then each p): "quality (mean experts searched)"."""
    settings = list(dict.fromkeys(p["setting"] for pts in curves.values() for p in pts))
    lines = [
        f"| router ({quality} (mean experts searched)) | " + " | ".join(settings) + " |",
        "|---" * (len(settings) + 1) + "|",
    ]
    for name, points in curves.items():
        by = {p["setting"]: p for p in points}
        cells = [f"{by[c]['quality']:.3f} ({by[c]['experts']:.2f})" if c in by else "–" for c in settings]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RETRIEVAL_COLUMNS = ("ndcg@10", "recall@10", "recall@100", "mrr@10", "relevant_share", "sources", "scanned")


def retrieval_table(report: dict[str, Any]) -> str:
    """Side by side: each router at 1 source, 2 sources and top-p, then exhaustive and oracle-source search."""
    head = [
        "router",
        "sources searched",
        "source acc@1",
        "ECE",
        "nDCG@10",
        "recall@10",
        "recall@100",
        "MRR@10",
        "relevant docs in searched sources",
        "mean sources",
        "scanned share",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    label = {
        "1": "1",
        "2": "2",
        "adaptive": f"top-p {report['top_p']:g} (≤ {report['max_experts']})",
        "1.5_sources": "top-p at 1.5 on average",
        "exhaustive": "all (one flat index)",
        "oracle": "1 (the gold source)",
    }
    for name, row in report["routers"].items():
        for setting, text in label.items():
            if f"ndcg@10@{setting}" not in row:
                continue
            acc, ece = row.get("source_acc@1"), row.get("ece")
            cells = [
                f"{row[f'{c}@{setting}']:.3f}" if c != "sources" else f"{row[f'{c}@{setting}']:.2f}"
                for c in RETRIEVAL_COLUMNS
            ]
            shown = (
                f"{name} *(scans everything to route)*"
                if row.get("scans_everything") and setting not in ("exhaustive",)
                else name
            )
            head_cells = " | ".join("–" if v is None else f"{v:.3f}" for v in (acc, ece))
            lines.append(f"| {shown} | {text} | {head_cells} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_retrieval_outputs(report: dict[str, Any], out_dir: Path) -> None:
    """report.json, table.md (side-by-side table and frontier table) and frontier.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    title = f"{report['dataset']} ({report['experts']} sources, {report['queries']} {report['split']} queries)"
    (out_dir / "table.md").write_text(
        f"### {title}\n\n{retrieval_table(report)}\n\nGate ECE of the top-1 probability: {report['ece']:.4f} "
        f"(a perfectly calibrated gate with these confidences: {report['ece_noise_floor']:.4f} on average, sampling "
        f"noise alone). Baselines' probabilities for top-p: {report['baseline_temperature_fit']}. The gate's hits of "
        f"several sources are merged by score + {report['prior_weight']:g} * log p(source), "
        "the baselines' by score.\n\n"
        f"#### Frontier: nDCG@10 against mean sources searched\n\n{frontier_table(report['frontier'], 'nDCG@10')}\n"
    )
    curves = {n: c for n, c in report["frontier"].items() if not n.startswith("random")}
    plots.plot_frontier(
        curves,
        out_dir / "frontier.png",
        f"nDCG@10 vs sources searched: {title}",
        "nDCG@10 against qrels",
        {"exhaustive search": report["ndcg@10@exhaustive"], "oracle source": report["ndcg@10@oracle"]},
    )


def _adaptive_summary(report: dict[str, Any], k: int) -> str:
    """The gate's top-p operating point and top-p at matched cost (1.5 experts; top-2's scanned share)."""
    gate = report["routers"][GATE]
    line = (
        f"Gate top-p {report['top_p']:g} (≤ {report['max_experts']} experts): recall@{k} "
        f"{gate[f'recall@{k}@adaptive']:.4f} at {gate['experts@adaptive']:.2f} experts on average "
        f"(scanned {gate['scanned@adaptive']:.3f})."
    )
    if f"recall@{k}@1.5_experts" in gate:
        line += (
            f" Top-p at 1.5 experts on average (p = {gate['p@1.5_experts']:.4f}, {gate['experts@1.5_experts']:.3f} "
            f"experts): recall@{k} {gate[f'recall@{k}@1.5_experts']:.4f}."
        )
    if f"recall@{k}@top2_scanned" in gate:
        line += (
            f" Top-p at top-2's scanned share {gate['scanned@2']:.3f} (p = {gate['p@top2_scanned']:.4f}, scanned "
            f"{gate['scanned@top2_scanned']:.3f}): recall@{k} {gate[f'recall@{k}@top2_scanned']:.4f} vs top-2's "
            f"{gate[f'recall@{k}@2']:.4f}."
        )
    return line + f" Baselines' probabilities: {report['baseline_temperature_fit']}."


def write_outputs(
    report: dict[str, Any], out_dir: Path, searched: list[int], k: int, router: Router, scores: dict[str, np.ndarray]
) -> None:
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
        extra += (
            f"\nCapacity factor {c['factor']} at {c['experts_searched']} experts: max/mean load "
            f"{c['max_over_mean']:.3f} (uncapped {c['max_over_mean_uncapped']:.3f}), recall@{k} "
            f"{c[f'recall@{k}']:.4f} (uncapped {c[f'recall@{k}_uncapped']:.4f}).\n"
        )
    if "out_of_scope" in report and "threshold" in report["out_of_scope"]:
        o = report["out_of_scope"]
        extra += (
            f"\nAbstention at the validation-chosen threshold {o['threshold']:.3f}: {100 * o['in_scope_kept']:.1f}% "
            f"of in-scope test queries kept, {100 * o['oos_refused']:.1f}% of out-of-scope refused.\n"
        )
    adaptive = _adaptive_summary(report, k)
    (out_dir / "table.md").write_text(
        f"### {title}\n\n{table}\n\nECE of the top-1 probability: {cal['calibrated']['ece']:.4f} at T = "
        f"{cal['temperature']:.3f} ({cal['uncalibrated (T=1)']['ece']:.4f} at T = 1).\n"
        f"{extra}\nSpeed (same run):\n{speed}\n"
        f"\n#### Frontier: recall@{k} vs exhaustive against mean experts searched\n\n{adaptive}\n\n"
        f"{frontier_table(report['frontier'], f'recall@{k}')}\n"
    )
    curves = {n: c for n, c in report["frontier"].items() if not n.startswith("random")}
    plots.plot_frontier(
        curves, out_dir / "frontier.png", f"recall@{k} vs experts searched: {title}", f"recall@{k} vs exhaustive search"
    )
    curves = {n: r for n, r in report["routers"].items() if not n.startswith("random")}
    plots.recall_curve(curves, searched, k, out_dir / "recall.png", title)
    shares = {
        n: load_stats(top_experts(s, 1), router.num_experts)["shares"]
        for n, s in scores.items()
        if n in (GATE, "centroid")
    }
    plots.load_bars(shares, router.expert_names, out_dir / "load.png", f"top-1 load: {title}")
    plots.reliability_diagram(
        {n: cal[n]["bins"] for n in ("calibrated", "uncalibrated (T=1)")},
        out_dir / "reliability.png",
        f"reliability: {report['dataset']}",
    )
