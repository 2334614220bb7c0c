"""scripts/experts.py: one lifecycle operation on a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

from moe_router import lifecycle
from moe_router.data.datasets import load_jsonl
from moe_router.embed.cache import default_cache_dir
from moe_router.eval.plots import plot_load
from moe_router.logs import quiet_libraries
from moe_router.routing.router import Router
from moe_router.train.finetune import FineTuneConfig, fine_tune, fine_tune_from_feedback, fine_tuner


@dataclass
class ExpertsRun:
    """What scripts/experts.py did."""

    op: str
    lines: list[str]  # human-readable report
    saved: Path | None = None  # checkpoint written (None: nothing changed on disk, or only feedback appended)
    data: dict | None = None


def read_texts(path: str | Path, split: str | None = None) -> tuple[list[str], list[Any]]:
    """Texts from a dataset JSONL (optionally one split; with their records) or a plain file (one text a line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        records = [r for r in load_jsonl(path) if split is None or r.split == split]
        if not records:
            raise ValueError(f"{path}: no records{f' in split {split!r}' if split else ''}")
        return [r.text for r in records], records
    if not path.is_file():
        raise FileNotFoundError(f"texts file not found: {path}")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path}: no texts (expected one text a line)")
    return texts, [None] * len(texts)


@dataclass
class Change:
    """What a changing operation did: its report line, the experts to fine-tune after, or that nothing changed."""

    what: str
    changed: list[str] = field(default_factory=list)  # experts created (fine-tuned after, with cfg.fine_tune_after)
    lines: list[str] = field(default_factory=list)  # extra report lines before `what`
    unchanged: bool = False  # nothing to save
    data: dict = field(default_factory=dict)


# Read-only operations: (router, cfg) -> (report lines, data). Nothing is saved.


def _stats(router: Router, cfg: Any) -> tuple[list[str], dict]:
    queries = read_texts(cfg.stats.queries_file, cfg.stats.split)[0] if cfg.stats.queries_file else None
    report = lifecycle.load_report(router, queries, cfg.stats.top_k, cfg.stats.over, cfg.stats.under)
    lines = [lifecycle.load_chart(report)]
    if cfg.stats.plot:
        lines.append(f"plot: {plot_load(report, cfg.stats.plot)}")
    return lines, {"load": [asdict(r) for r in report.rows]}


def _recommend(router: Router, cfg: Any) -> tuple[list[str], dict]:
    recs = lifecycle.recommendations(router, instantiate(cfg.rules))
    lines = [
        f"{r.expert}: {r.action} ({r.reason})" + (f"; merge candidate {r.merge_with}" if r.merge_with else "")
        for r in recs
    ] or ["no recommendation: no expert meets a rule"]
    lines += [f"  {s.expert}: {s.positive}/{s.total} positive" for s in lifecycle.feedback_stats(router) if s.total]
    return lines, {"recommendations": [asdict(r) for r in recs]}


# Changing operations: (router, cfg, fine-tune config) -> Change; the changed router is saved atomically.


def _feedback(router: Router, cfg: Any, tune: FineTuneConfig) -> Change:
    seq = router.record_feedback(cfg.feedback.query, cfg.feedback.expert, bool(cfg.feedback.positive))
    return Change(f"feedback #{seq} recorded: {cfg.feedback.expert} {'+' if cfg.feedback.positive else '-'}")


def _add(router: Router, cfg: Any, tune: FineTuneConfig) -> Change:
    texts, _ = read_texts(cfg.add.texts_file, cfg.add.split)
    router.add_expert(cfg.add.name, texts=texts, specialization=cfg.add.specialization or "", parent=cfg.add.parent)
    return Change(f"added {cfg.add.name!r} ({len(texts)} texts)", [cfg.add.name])


def _remove(router: Router, cfg: Any, tune: FineTuneConfig) -> Change:
    router.remove_expert(cfg.remove.name)
    return Change(f"removed {cfg.remove.name!r}")


def _merge(router: Router, cfg: Any, tune: FineTuneConfig) -> Change:
    e = lifecycle.merge_experts(router, cfg.merge.a, cfg.merge.b, cfg.merge.name)
    return Change(f"merged {cfg.merge.a!r} and {cfg.merge.b!r} into {e.name!r} ({e.ntotal} vectors)", [e.name])


def _split(router: Router, cfg: Any, tune: FineTuneConfig) -> Change:
    parts = lifecycle.split_expert(
        router, cfg.split.name, cfg.split.parts, cfg.split.names, cfg.seed, cfg.split.max_imbalance
    )
    return Change(
        f"split {cfg.split.name!r} into " + ", ".join(f"{e.name!r} ({e.ntotal})" for e in parts),
        [e.name for e in parts],
    )


def _auto(router: Router, cfg: Any, tune: FineTuneConfig) -> Change:
    texts, records = read_texts(cfg.auto.data, cfg.auto.split)
    if cfg.auto.by == "category":
        rep = lifecycle.auto_create_by_category(
            router,
            [getattr(r, cfg.auto.field) for r in records],
            texts,
            min_docs=cfg.auto.min_docs,
            parent=cfg.auto.parent,
        )
    elif cfg.auto.by == "kmeans":
        rep = lifecycle.auto_create_by_clustering(
            router,
            cfg.auto.n,
            texts,
            max_imbalance=cfg.auto.max_imbalance,
            seed=cfg.seed,
            prefix=cfg.auto.prefix,
            parent=cfg.auto.parent,
        )
    else:
        raise ValueError(f"auto.by must be 'category' or 'kmeans', got {cfg.auto.by!r}")
    changed = [n for n, _ in rep.created]
    what = "created " + (", ".join(f"{n} ({c})" for n, c in rep.created) or "no expert")
    what += "".join(f"; skipped {c!r}: too few documents ({m} < {cfg.auto.min_docs})" for c, m in rep.skipped)
    return Change(what + ("" if changed else " (checkpoint unchanged)"), changed, unchanged=not changed)


def _learn(router: Router, cfg: Any, tune: FineTuneConfig) -> Change:
    res = fine_tune_from_feedback(router, tune)
    return Change(
        f"fine-tuned from {res.focus} feedback records + {res.replayed} replayed vectors in {res.seconds:.1f} s"
    )


def _optimize(router: Router, cfg: Any, tune: FineTuneConfig) -> Change:
    o = cfg.optimize
    texts, _ = read_texts(o.val_file, o.split)
    rep = lifecycle.optimize_routing(
        router,
        texts,
        top_experts_searched=o.top_experts,
        k=o.k,
        fine_tune=fine_tuner(tune) if cfg.fine_tune_after else None,
        rebalance=o.rebalance,
        merge=o.merge,
        split=o.split_overloaded,
        merge_overlap=o.merge_overlap,
        overload=o.overload,
        underload=o.underload,
        tolerance=o.tolerance,
        max_scan_increase=o.max_scan_increase,
        seed=cfg.seed,
    )
    lines = [
        f"{a.kind} {', '.join(a.experts)}: {'kept' if a.kept else 'rejected'} ({a.note}); recall@k "
        f"{a.before.recall:.4f} -> {a.after.recall:.4f}, scanned {a.before.scanned:.4f} -> "
        f"{a.after.scanned:.4f}, load max/mean {a.before.max_over_mean:.2f} -> {a.after.max_over_mean:.2f}"
        for a in rep.actions
    ]
    what = (
        f"rebalanced {rep.count('rebalance')}, merged {rep.count('merge')}, split {rep.count('split')}; "
        f"measured recall@k improvement on {len(texts)} validation queries: {100 * rep.improvement:+.2f} points"
    )
    kept = any(a.kept for a in rep.actions)
    return Change(
        what + ("" if kept else " (router unchanged, nothing saved)"),
        lines=lines,
        unchanged=not kept,
        data={"optimize": {"before": asdict(rep.before), "after": asdict(rep.after), "improvement": rep.improvement}},
    )


READ_ONLY: dict[str, Callable[[Router, Any], tuple[list[str], dict]]] = {"stats": _stats, "recommend": _recommend}
CHANGES: dict[str, Callable[[Router, Any, FineTuneConfig], Change]] = {
    "feedback": _feedback,
    "add": _add,
    "remove": _remove,
    "merge": _merge,
    "split": _split,
    "auto": _auto,
    "learn": _learn,
    "optimize": _optimize,
}


def run(cfg: Any) -> ExpertsRun:
    """One lifecycle operation (cfg.op) on the checkpoint cfg.ckpt; changes are saved atomically to cfg.out or cfg.ckpt.

    A loaded router's store is a private in-memory copy, so a failed operation leaves the
    checkpoint on disk exactly as it was; every change, feedback too, reaches it through one save.
    """
    quiet_libraries()
    op = str(cfg.op)
    if op not in READ_ONLY and op not in CHANGES:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join([*READ_ONLY, *CHANGES])}")
    router = Router.load(cfg.ckpt, cache_dir=cfg.cache_dir or default_cache_dir())
    if op in READ_ONLY:
        lines, data = READ_ONLY[op](router, cfg)
        return ExpertsRun(op, lines, None, data)
    tune: FineTuneConfig = instantiate(cfg.fine_tune)
    change = CHANGES[op](router, cfg, tune)
    lines = [*change.lines, change.what]
    if change.unchanged:
        return ExpertsRun(op, lines, None, change.data)
    if change.changed and cfg.fine_tune_after and router.gate is not None and router.num_experts >= 2:
        res = fine_tune(router, change.changed, tune)
        lines.append(
            f"fine-tuned on {res.focus} vectors of {change.changed} + {res.replayed} replayed in {res.seconds:.1f} s"
        )
    out = Path(cfg.out or cfg.ckpt)
    # The training config still describes how the gate was first trained; its metrics no longer apply.
    router.set_training_info(router.config, {**router.metrics, "last_lifecycle_op": "; ".join(lines[-2:])})
    router.save(out)
    lines.append(f"checkpoint: {out} ({router.num_experts} experts, {router.ntotal} vectors)")
    return ExpertsRun(op, lines, out, change.data)
