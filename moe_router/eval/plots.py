"""The plots of the reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_router.lifecycle.load_report import LoadReport


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, title: str) -> Path:
    """Title, legend, layout, write the PNG and free the figure."""
    plt = _plt()
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recall_curve(rows: dict[str, dict[str, Any]], experts_searched: list[int], k: int, path: Path, title: str) -> Path:
    """recall@k vs experts searched, one line per router."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in rows.items():
        pts = [(t, row[f"recall@{k}@{t}"]) for t in experts_searched if f"recall@{k}@{t}" in row]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("experts searched per query")
    ax.set_ylabel(f"recall@{k} vs exhaustive search")
    ax.set_xticks(experts_searched)
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, title)


def plot_frontier(
    curves: dict[str, list[dict[str, Any]]],
    path: Path,
    title: str,
    quality: str,
    references: dict[str, float] | None = None,
) -> Path:
    """Quality vs mean experts searched, one colour per router: top-k as a solid line, top-p (the p grid) dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, points) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        for prefix, style, marker, label in (("top-", "-", "o", name), ("p=", "--", "x", None)):
            pts = sorted((p["experts"], p["quality"]) for p in points if p["setting"].startswith(prefix))
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker=marker, color=colour, label=label, ms=4)
    for j, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, color="k", lw=0.9, ls=(":", "-.", "--")[j % 3], label=name)
    ax.set_xlabel("mean experts (sources) searched per query  (solid: top-k, dashed: top-p over the p grid)")
    ax.set_ylabel(quality)
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, title)


def load_bars(shares: dict[str, list[float]], names: list[str], path: Path, title: str) -> Path:
    """Share of top-1 assignments per expert, grouped bars per router."""
    plt = _plt()
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(7, 0.25 * len(names) * len(shares)), 4.5))
    width = 0.8 / max(len(shares), 1)
    x = np.arange(len(names))
    for i, (router, s) in enumerate(shares.items()):
        ax.bar(x + i * width, s, width, label=router)
    ax.axhline(1 / len(names), color="k", lw=0.8, ls="--", label="uniform")
    ax.set_xticks(x + width * (len(shares) - 1) / 2)
    ax.set_xticklabels(names if len(names) <= 32 else [""] * len(names), rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("share of queries (top-1)")
    return _save(fig, ax, path, title)


def reliability_diagram(curves: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path:
    """Accuracy vs confidence per bin, one curve per calibration state."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    for name, b in curves.items():
        pts = [(c, a) for c, a, n in zip(b["confidence"], b["accuracy"], b["count"]) if n > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("accuracy")
    return _save(fig, ax, path, title)


def plot_load(report: LoadReport, path: str | Path) -> Path:
    """Write the load report as a PNG bar chart (average and the over/under limits drawn as lines)."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [r.expert for r in report.rows]
    shares = [100 * r.load_share for r in report.rows]
    colours = ["#d62728" if r.flag == "over" else "#ff7f0e" if r.flag == "under" else "#1f77b4" for r in report.rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.5))
    try:
        ax.bar(range(len(names)), shares, color=colours)
        avg = 100 / max(len(names), 1)
        for level, style in ((1.0, "-"), (report.over, "--"), (report.under, ":")):
            ax.axhline(avg * level, color="grey", linestyle=style, linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("load share (%)")
        ax.set_title(f"Expert load ({report.total} assignments; lines: average, {report.over}x, {report.under}x)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
