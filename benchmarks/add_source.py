"""Adding a source to a retrieval router at runtime (issue 18): leave one source out, add it back, fine-tune.

    python benchmarks/add_source.py --new med cran --folds 0 1 [--datasets-dir ../shared/datasets]

For each held-out source S of classic and each dev fold f (data.holdout_folds=2): a router is trained
as scripts/train.py trains it (configs/train.yaml, data=classic, calibrated on the 'dev' part of the
other sources' dev queries) on the other sources (--sources: all 8 by default); then S's documents
are embedded and added with add_expert and the gate fine-tuned. Measured on the 'heldout' part of
dev (never test, never seen by training or calibration): the old sources' source acc@1 and nDCG@10
(1 source, adaptive) before the add, after it and after each fine-tune, and S's own queries' acc@1
and nDCG@10. The fine-tunes:

- documents only: FineTuneConfig(query_weight=0, recalibrate=False, keep_margin=None), what fine_tune
  did before the router kept its calibration queries;
- the default fine_tune: the calibration refitted on the kept calibration queries (replayed as
  training pairs only with FineTuneConfig.query_weight > 0), the old gate kept when worse on the old
  sources' calibration queries;
- the new expert only: FineTuneConfig(train_only_focus=True), every other expert's output frozen,
  then the default recalibration and guard;
- gradient steps: FineTuneConfig(refit_linear=False), the default before a linear head was refitted
  (on a router with a linear head the default now refits it instead: FineTuneConfig.refit_linear);
- head weight fitted: FineTuneConfig(linear_weight="fit"), the refit with the head's weight fitted on the
  kept calibration queries instead of training's;
- then S's 'dev'-part queries given as judged queries (lifecycle.add_judged_queries) and the default
  fine_tune run again; S's 'heldout' part is what is measured.

Time is split into embedding S's documents, add_expert (vectors given) and each fine-tune. Trained
routers are cached in --cache-dir. --smoke: three small sources, a hashing embedder, one epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from moe_router.apps.train import train  # noqa: E402
from moe_router.checkpoint.format import POINTER  # noqa: E402
from moe_router.data.beir import BeirDataset  # noqa: E402
from moe_router.embed.cache import default_cache_dir  # noqa: E402
from moe_router.eval.retrieval import evaluate_retrieval  # noqa: E402
from moe_router.lifecycle.judged import add_judged_queries  # noqa: E402
from moe_router.logs import quiet_libraries  # noqa: E402
from moe_router.routing.router import Router  # noqa: E402
from moe_router.train.finetune import FineTuneConfig, fine_tune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SOURCES = ("adi", "cacm", "cisi", "cran", "lisa", "med", "npl", "time")  # classic's sources
SMOKE_SOURCES = ("adi", "med", "time")  # the three smallest corpora: seconds with a hashing embedder
KEYS = ("source_acc@1", "ndcg@10@1", "ndcg@10@adaptive", "sources@adaptive")  # what each table cell reports
DOCS_ONLY = FineTuneConfig(  # the fine-tune before this issue
    query_weight=0.0, recalibrate=False, keep_margin=None, refit_linear=False
)
GRADIENT = FineTuneConfig(refit_linear=False)  # the default before the linear head was refitted


def compose_train(args: argparse.Namespace, sources: list[str], fold: int) -> Any:
    """configs/train.yaml for classic restricted to `sources`, dev dealt into 2 folds, fold `fold` held out."""
    overrides = [
        "data=classic",
        f"datasets_dir={args.datasets_dir}",
        f"data.sources=[{','.join(sources)}]",
        "data.holdout_folds=2",
        f"data.holdout_fold={fold}",
        f"seed={args.seed}",
        "trainer.enable_progress_bar=false",
    ]
    if args.smoke:
        overrides += ["embedder=hashing", "trainer.max_epochs=1", "model.prototypes_per_expert=8"]
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=overrides)


def trained(cfg: Any, path: Path, cache_dir: Path) -> tuple[Router, BeirDataset, float]:
    """The router of `cfg` (cached at `path`, else trained by scripts/train.py's train()), its data, train seconds."""
    dataset = instantiate(cfg.data)
    if not (path / POINTER).is_file():
        cfg = OmegaConf.merge(
            cfg, {"out": str(path), "cache_dir": str(cache_dir), "log_dir": tempfile.mkdtemp(prefix="add-source-")}
        )
        start = time.perf_counter()
        router = train(cfg).router  # saved to `path`; saved again below with its training time
        seconds = time.perf_counter() - start
        router.set_training_info(router.config, {**router.metrics, "train_seconds": seconds})
        router.save(path)
    router = Router.load(path, cache_dir=cache_dir)
    return router, dataset, float(router.metrics["train_seconds"])


def measure(router: Router, dataset: BeirDataset) -> dict[str, float]:
    """The gate's source acc@1 and nDCG@10 on the dataset's 'heldout' queries (moe_router.eval.retrieval)."""
    report, _ = evaluate_retrieval(router, dataset, "heldout", baselines=())
    return {"queries": report["queries"], **{k: float(report[k]) for k in KEYS}}


def tune(router: Router, new: str, cfg: FineTuneConfig) -> dict[str, Any]:
    result = fine_tune(router, [new], cfg)
    return dataclasses.asdict(result)


def run_one(args: argparse.Namespace, new: str, fold: int, cache_dir: Path) -> dict[str, Any]:
    """One held-out source and fold: the table rows (old / new queries per stage) and the timings."""
    old = [s for s in args.sources if s != new]
    cfg = compose_train(args, old, fold)
    name = f"{cfg.data.name}-{'-'.join(old)}-fold{fold}{'-smoke' if args.smoke else ''}"  # the sources it holds
    path = Path(args.cache_dir) / name
    base, old_data, train_seconds = trained(cfg, path, cache_dir)
    new_data = instantiate(compose_train(args, [new], fold).data)  # S's documents and its own two dev folds
    emb = base.embedder

    start = time.perf_counter()
    docs = new_data.documents(new)
    vectors = emb.encode(docs)
    embed_seconds = time.perf_counter() - start
    rows: dict[str, dict[str, Any]] = {"before the add": {"old": measure(base, old_data)}}

    def added() -> tuple[Router, float]:
        router = Router.load(path, cache_dir=cache_dir)
        start = time.perf_counter()
        router.add_expert(new, vectors=vectors, texts=docs, metadata=new_data.metadata())
        return router, time.perf_counter() - start

    router, add_seconds = added()
    rows["after add_expert"] = {"old": measure(router, old_data), "new": measure(router, new_data)}
    steps = dict(steps=args.steps) if args.steps else {}
    tuned: dict[str, dict] = {}
    docs_only, _ = added()
    tuned["documents only"] = tune(docs_only, new, dataclasses.replace(DOCS_ONLY, **steps))
    rows["+ fine_tune, documents only (before)"] = {
        "old": measure(docs_only, old_data),
        "new": measure(docs_only, new_data),
    }
    focus_only, _ = added()
    tuned["new expert only"] = tune(focus_only, new, FineTuneConfig(train_only_focus=True, **steps))
    rows["+ fine_tune, new expert only (train_only_focus)"] = {
        "old": measure(focus_only, old_data),
        "new": measure(focus_only, new_data),
    }
    gradient, _ = added()
    tuned["gradient"] = tune(gradient, new, dataclasses.replace(GRADIENT, **steps))
    rows["+ fine_tune, gradient steps (refit_linear=False)"] = {
        "old": measure(gradient, old_data),
        "new": measure(gradient, new_data),
    }
    fitted, _ = added()
    tuned["weight fitted"] = tune(fitted, new, FineTuneConfig(linear_weight="fit", **steps))
    rows["+ fine_tune, head weight fitted (linear_weight='fit')"] = {
        "old": measure(fitted, old_data),
        "new": measure(fitted, new_data),
    }
    tuned["default"] = tune(router, new, FineTuneConfig(**steps))
    rows["+ fine_tune (default: recalibrate, guard)"] = {
        "old": measure(router, old_data),
        "new": measure(router, new_data),
    }
    judged = add_judged_queries(router, new_data.queries("dev"), new_data.gold_sources("dev"))
    tuned["with judged"] = tune(router, new, FineTuneConfig(**steps))
    rows[f"+ {judged} judged {new} queries, fine_tune again"] = {
        "old": measure(router, old_data),
        "new": measure(router, new_data),
    }
    return {
        "new_source": new,
        "old_sources": old,
        "fold": fold,
        "documents": len(docs),
        "calibration_queries": len(base.calibration),
        "judged_new_queries": judged,
        "rows": rows,
        "fine_tunes": tuned,
        "seconds": {
            "train_old_sources": train_seconds,
            "embed_documents": embed_seconds,
            "add_expert": add_seconds,
            "fine_tune_documents_only": tuned["documents only"]["seconds"],
            "fine_tune_new_expert_only": tuned["new expert only"]["seconds"],
            "fine_tune_gradient": tuned["gradient"]["seconds"],
            "fine_tune_weight_fitted": tuned["weight fitted"]["seconds"],
            "fine_tune_default": tuned["default"]["seconds"],
            "fine_tune_with_judged": tuned["with judged"]["seconds"],
        },
    }


def table(run: dict[str, Any]) -> str:
    """Markdown rows of one run: old sources' and the new source's acc@1 / nDCG@10 at each stage."""
    out = [
        f"**{run['new_source']}** held out, fold {run['fold']}: {run['documents']} documents added; "
        f"{run['rows']['before the add']['old']['queries']} queries of the {len(run['old_sources'])} old sources and "
        f"{run['rows']['after add_expert']['new']['queries']} {run['new_source']} held-out queries; "
        f"{run['calibration_queries']} calibration queries kept",
        "",
        "| stage | old acc@1 | old nDCG@10 (1 source) | old nDCG@10 (adaptive) | new acc@1 | new nDCG@10 (1 source) |",
        "|---|---|---|---|---|---|",
    ]
    for stage, r in run["rows"].items():
        o, n = r["old"], r.get("new")
        cells = [f"{o['source_acc@1']:.3f}", f"{o['ndcg@10@1']:.3f}", f"{o['ndcg@10@adaptive']:.3f}"]
        cells += [f"{n['source_acc@1']:.3f}", f"{n['ndcg@10@1']:.3f}"] if n else ["-", "-"]
        out.append(f"| {stage} | " + " | ".join(cells) + " |")
    s = run["seconds"]
    kept = {k: v["kept_old_gate"] for k, v in run["fine_tunes"].items()}
    out += [
        "",
        f"time: embedding {s['embed_documents']:.1f} s, add_expert {s['add_expert']:.2f} s, fine_tune "
        f"{s['fine_tune_documents_only']:.1f} s (documents only) / {s['fine_tune_new_expert_only']:.1f} s (new expert "
        f"only) / {s['fine_tune_gradient']:.1f} s (gradient) / {s['fine_tune_default']:.1f} s (default) / "
        f"{s['fine_tune_with_judged']:.1f} s (with judged); old gate kept: {kept}",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--new", nargs="+", default=["med", "cran"], help="sources held out of training, one run each")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), help="the classic sources the router is built on")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1], help="dev folds held out (2-fold cross-validation)")
    p.add_argument("--datasets-dir", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--cache-dir", default="reports/tmp/add_source", help="trained 7-source routers are cached here")
    p.add_argument("--out", default="reports/add_source", help="results: <out>/add_source.json and .md")
    p.add_argument("--steps", type=int, default=None, help="fine-tune optimiser steps (default: FineTuneConfig's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="every step on three small sources in seconds (tests run it)")
    args = p.parse_args()
    quiet_libraries()
    cache_dir = default_cache_dir()
    if args.smoke:
        work = Path(tempfile.mkdtemp(prefix="add-source-smoke-"))
        args.cache_dir, args.out, cache_dir = str(work / "routers"), str(work / "out"), work / "embeddings"
        args.new, args.folds, args.steps, args.sources = ["med"], [0], 5, list(SMOKE_SOURCES)
    bad = [s for s in [*args.sources, *args.new] if s not in SOURCES] or [s for s in args.new if s not in args.sources]
    if bad:
        raise SystemExit(f"{bad[0]!r} is not one of --sources {args.sources} (classic's sources: {list(SOURCES)})")
    runs = []
    for new in args.new:
        for fold in args.folds:
            run = run_one(args, new, fold, cache_dir)
            print(table(run), flush=True)
            runs.append(run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "add_source.json").write_text(json.dumps({"runs": runs, "args": vars(args)}, indent=2))
    (out / "add_source.md").write_text("# Adding a source to the classic router\n\n" + "\n".join(map(table, runs)))
    print(f"wrote {out / 'add_source.json'} and {out / 'add_source.md'}")


if __name__ == "__main__":
    main()
