"""Adding, merging and splitting experts of an intent router with a linear head: the default fine-tune
(refit) against gradient steps.

    python benchmarks/add_intent.py --data stackoverflow20 --new wordpress
    python benchmarks/add_intent.py --data banking77 --new card_arrival --json out.json
    python benchmarks/add_intent.py --data stackoverflow20 --ops merge split --merge cocoa osx --split excel

The router is trained as scripts/train.py trains it (configs/train.yaml with the data's
configs/cv_chosen file: stackoverflow20 and banking77 have the linear head). Each op starts from
that trained router and fine-tunes the changed router three times from the same starting point: the
default (FineTuneConfig: the linear head refitted over every expert at training's weight, then the
recalibration and guard), the same with the head's weight fitted on the judged queries
(FineTuneConfig(linear_weight="fit")) and FineTuneConfig(refit_linear=False) (gradient steps, the default before).
  add    --new's train and val rows are left out of training (a router of its own); its train texts
         are added with add_expert, then fine_tune(router, [new]).
  merge  the two --merge experts become one (lifecycle.merge_experts), then fine_tune(router, [a+b]).
  split  the --split expert becomes two by k-means (lifecycle.split_expert), then fine_tune on the parts.
Printed, on the test split, per stage: acc@1 and acc@2 of the queries of the experts the op left
alone ("old"), and acc@1 of the changed experts' queries ("changed": the new expert's; the merged
pair's, counted right on the merged expert or, before the merge, on either of the two; the split
expert's, counted right on any of its parts). --smoke: the demo data, a hashing embedder, one epoch,
every op (seconds; the tests run it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lifecycle_common import full_train  # noqa: E402

from moe_router import lifecycle  # noqa: E402
from moe_router.data.datasets import TextDataset  # noqa: E402
from moe_router.embed.cache import CachedEmbedder, default_cache_dir  # noqa: E402
from moe_router.logs import quiet_libraries  # noqa: E402
from moe_router.routing.router import Router  # noqa: E402
from moe_router.train.finetune import FineTuneConfig, fine_tune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TUNES = {
    "default (refit)": FineTuneConfig(),
    "refit, weight fitted (linear_weight='fit')": FineTuneConfig(linear_weight="fit"),
    "gradient steps (refit_linear=False)": FineTuneConfig(refit_linear=False),
}
OPS = ("add", "merge", "split")


def group_accuracy(router: Router, probs: np.ndarray, groups: list[tuple[str, ...]], k: int) -> float:
    """Share of queries whose top-k experts include one of their group's experts (names absent: never)."""
    index = {n: i for i, n in enumerate(router.expert_names)}
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    hit = [any(index.get(n, -1) in row for n in g) for row, g in zip(top, groups, strict=True)]
    return float(np.mean(hit)) if hit else float("nan")


def measure(router: Router, xq: np.ndarray, groups: list[tuple[str, ...]], changed: np.ndarray) -> dict[str, float]:
    probs = router.gate_probs(xq)
    old = [g for g, c in zip(groups, changed, strict=True) if not c]
    out = {
        "old acc@1": group_accuracy(router, probs[~changed], old, 1),
        "old acc@2": group_accuracy(router, probs[~changed], old, 2),
    }
    mine = [g for g, c in zip(groups, changed, strict=True) if c]
    if any(n in router.expert_names for g in mine for n in g):  # before an add: not there yet
        out["changed acc@1"] = group_accuracy(router, probs[changed], mine, 1)
    return out


def run_op(
    op: str,
    path: Path,
    cache: Path,
    xq: np.ndarray,
    experts: np.ndarray,
    change: Callable[[Router], list[str]],
    before: dict[str, tuple[str, ...]],
    after: dict[str, tuple[str, ...]],
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, object]]]:
    """Rows of one op: before it, after it, after each fine-tune; `before`/`after` name each changed
    label's experts (labels absent map to themselves)."""
    changed = np.isin(experts, list(before))
    groups_before = [before.get(e, (e,)) for e in experts]
    groups_after = [after.get(e, (e,)) for e in experts]
    rows = {"before": measure(Router.load(path, cache_dir=cache), xq, groups_before, changed)}
    tunes: dict[str, dict[str, object]] = {}
    for name, tune in TUNES.items():
        router = Router.load(path, cache_dir=cache)
        focus = change(router)
        rows[f"after {op}"] = measure(router, xq, groups_after, changed)
        result = fine_tune(router, focus, tune)
        rows[f"+ fine_tune, {name}"] = measure(router, xq, groups_after, changed)
        tunes[name] = {
            "seconds": result.seconds,
            "refit_linear": result.refit_linear,
            "kept_old_gate": result.kept_old_gate,
            "linear_weight": result.linear_weight,
        }
    return rows, tunes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="stackoverflow20", help="an intent data config (configs/data)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=["add"], help="what to do to the trained router")
    p.add_argument("--new", default="wordpress", help="add: the expert left out of training and added")
    p.add_argument("--merge", nargs=2, default=["cocoa", "osx"], metavar=("A", "B"), help="merge: two experts")
    p.add_argument("--split", default="excel", help="split: the expert split in two")
    p.add_argument("--datasets-dir", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--smoke", action="store_true", help="demo data, hashing embedder, one epoch, every op: seconds")
    args = p.parse_args()
    quiet_libraries()
    overrides = [f"data={args.data}", f"datasets_dir={args.datasets_dir}", f"seed={args.seed}"]
    cache = default_cache_dir()
    work = Path(tempfile.mkdtemp(prefix="add-intent-smoke-" if args.smoke else "add-intent-"))
    if args.smoke:
        args.data, args.ops, cache = "demo", list(OPS), work / "embeddings"
        args.new, args.merge, args.split = "security", ["frontend", "javascript"], "cloud"
        overrides = ["data=demo", "embedder=hashing", "trainer.max_epochs=1", "linear_weight=1", "seed=0"]
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "trainer.enable_progress_bar=false"])
    ds = instantiate(cfg.data)
    key = ds.expert_key
    named = {"add": [args.new], "merge": list(args.merge), "split": [args.split]}
    for name in [n for op in args.ops for n in named[op]]:
        if name not in ds.experts:
            raise SystemExit(f"{name!r} is not an expert of {args.data}; its experts: {ds.experts}")
    emb = CachedEmbedder(instantiate(cfg.embedder), cache)
    test = ds.split("test")
    xq = emb.encode([r.text for r in test])
    experts = np.array([getattr(r, key) for r in test])
    report: dict[str, object] = {}

    def trained(records: list, name: str) -> tuple[Path, Router, float]:
        router, took = full_train(TextDataset(ds.name, records, key), emb, args.seed, overrides, calibrate=True)
        return router.save(work / name), router, took.seconds

    full = None
    for op in args.ops:
        if op == "add":
            kept = [r for r in ds.records if not (r.split in ("train", "val") and getattr(r, key) == args.new)]
            path, router, seconds = trained(kept, "without_new")
            texts = [r.text for r in ds.split("train") if getattr(r, key) == args.new]

            def change(r: Router, texts: list[str] = texts) -> list[str]:
                r.add_expert(args.new, texts=texts)
                return [args.new]

            what = f"{args.new!r} left out of training and added ({len(texts)} train texts)"
            before, after = {args.new: ()}, {args.new: (args.new,)}
        else:
            if full is None:
                full = trained(list(ds.records), "all")
            path, router, seconds = full
            if op == "merge":
                a, b = args.merge

                def change(r: Router, a: str = a, b: str = b) -> list[str]:
                    return [lifecycle.merge_experts(r, a, b).name]

                what = f"{a!r} and {b!r} merged"
                before, after = {a: (a, b), b: (a, b)}, {a: (f"{a}+{b}",), b: (f"{a}+{b}",)}
            else:
                s = args.split

                def change(r: Router, s: str = s) -> list[str]:
                    return [e.name for e in lifecycle.split_expert(r, s)]

                what = f"{s!r} split in two"
                before, after = {s: (s,)}, {s: (f"{s}/0", f"{s}/1")}
        rows, tunes = run_op(op, path, cache, xq, experts, change, before, after)
        changed = int(np.isin(experts, list(before)).sum())
        print(
            f"\n{args.data}, {op}: {what}; {changed} test queries of the changed experts, "
            f"{len(experts) - changed} of the others; router trained in {seconds:.0f} s, linear head: "
            f"{router.gate.linear_head}, {len(router.calibration)} judged queries kept\n"
        )
        print("| stage | old acc@1 | old acc@2 | changed acc@1 |\n|---|---|---|---|")
        for stage, r in rows.items():
            cells = [f"{r['old acc@1']:.4f}", f"{r['old acc@2']:.4f}"]
            cells.append(f"{r['changed acc@1']:.4f}" if "changed acc@1" in r else "-")
            print(f"| {stage} | " + " | ".join(cells) + " |")
        print(
            "\nfine-tunes: "
            + ", ".join(
                f"{n} {t['seconds']:.1f} s (head weight {t['linear_weight']}, old gate kept: {t['kept_old_gate']})"
                for n, t in tunes.items()
            )
        )
        report[op] = {"what": what, "rows": rows, "fine_tunes": tunes}
    if args.json:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)}, **report}, indent=2))


if __name__ == "__main__":
    main()
