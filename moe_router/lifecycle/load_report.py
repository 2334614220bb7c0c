"""Per-expert load, confidence and feedback success, with imbalance flags and a text chart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_router.lifecycle.feedback import feedback_stats
from moe_router.routing.router import Router
from moe_router.types import SearchParams


@dataclass(frozen=True)
class LoadRow:
    expert: str
    vectors: int
    queries: int  # queries routed to it (among each query's chosen experts)
    load_share: float  # share of all (query, expert) assignments
    ratio: float  # load over the average load (1.0 = exactly average)
    mean_confidence: float  # mean gate probability when chosen
    success_rate: float | None  # from feedback; None without feedback
    flag: str  # 'over' (> over x average), 'under' (< under x average) or ''


@dataclass(frozen=True)
class LoadReport:
    rows: list[LoadRow]
    total: int  # (query, expert) assignments counted
    over: float
    under: float

    @property
    def imbalanced(self) -> list[LoadRow]:
        return [r for r in self.rows if r.flag]


def load_report(
    router: Router,
    queries: Any = None,
    top_k: int = 2,
    over: float = 1.5,
    under: float = 0.5,
) -> LoadReport:
    """Per expert load, confidence and feedback success; flags experts above `over` / below `under` x average.

    With `queries`, they are routed (top_k experts each, not counted in the router's stats) and
    the report covers them; otherwise it uses the router's live stats.
    """
    if queries is not None:
        xq, _ = router.prepare(queries)
        r = router.select(xq, SearchParams(top_experts=top_k), record=False)
        probs, top = r.probs, r.top
        counts = np.bincount(top.ravel(), minlength=router.num_experts)
        sums = np.bincount(top.ravel(), weights=np.take_along_axis(probs, top, 1).ravel(), minlength=router.num_experts)
    else:
        st = router.stats()
        counts = np.array([s.queries for s in st])
        sums = np.array([s.mean_confidence * s.queries for s in st])
    total = int(counts.sum())
    avg = total / max(router.num_experts, 1)
    success = {s.expert: s.success_rate for s in feedback_stats(router)}
    rows = []
    for e, c, s in zip(router.experts, counts, sums):
        ratio = c / avg if avg > 0 else 0.0
        flag = "" if total == 0 else "over" if ratio > over else "under" if ratio < under else ""
        rows.append(
            LoadRow(
                e.name,
                e.ntotal,
                int(c),
                c / total if total else 0.0,
                float(ratio),
                float(s / c) if c else 0.0,
                success[e.name],
                flag,
            )
        )
    return LoadReport(rows, total, over, under)


def load_chart(report: LoadReport, width: int = 40) -> str:
    """The load report as a text bar chart (one bar per expert, longest = `width` blocks)."""
    if not report.rows:
        return "(no experts)"
    name_w = max(len(r.expert) for r in report.rows)
    top = max((r.load_share for r in report.rows), default=0.0) or 1.0
    lines = []
    for r in report.rows:
        bar = "█" * int(round(width * r.load_share / top))
        success = "-" if r.success_rate is None else f"{100 * r.success_rate:.0f}%"
        flag = {
            "over": f"  ⚠ {r.ratio:.2f}x average (> {report.over}x)",
            "under": f"  ⚠ {r.ratio:.2f}x average (< {report.under}x)",
        }.get(r.flag, "")
        lines.append(
            f"{r.expert:<{name_w}} {bar:<{width}} {100 * r.load_share:5.1f}%  queries {r.queries}, "
            f"confidence {r.mean_confidence:.3f}, success {success}{flag}"
        )
    lines.append(f"{report.total} (query, expert) assignments; {len(report.imbalanced)} expert(s) imbalanced")
    return "\n".join(lines)
