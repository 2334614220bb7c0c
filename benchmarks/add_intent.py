"""Adding an expert to an intent router with a linear head: the default fine-tune (refit) against gradient steps.

    python benchmarks/add_intent.py --data stackoverflow20 --new wordpress
    python benchmarks/add_intent.py --data banking77 --new card_arrival --json out.json

The router is trained as scripts/train.py trains it (configs/train.yaml with the data's
configs/cv_chosen file: stackoverflow20 and banking77 have the linear head) on every expert but
--new, whose train and val rows are left out; then --new's train texts are added with add_expert
and the gate fine-tuned twice from the same added router: the default (FineTuneConfig: the linear
head refitted over every expert, then the recalibration and guard) and FineTuneConfig(refit_linear=False)
(gradient steps, the default before). Printed, on the test split: the old experts' acc@1 and acc@2
and the new expert's acc@1 before the add, after it and after each fine-tune. --smoke: the demo
data, a hashing embedder, one epoch (seconds; the tests run it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lifecycle_common import full_train  # noqa: E402

from moe_router.data.datasets import TextDataset  # noqa: E402
from moe_router.embed.cache import CachedEmbedder, default_cache_dir  # noqa: E402
from moe_router.logs import quiet_libraries  # noqa: E402
from moe_router.metrics import accuracy_at_k  # noqa: E402
from moe_router.routing.router import Router  # noqa: E402
from moe_router.train.finetune import FineTuneConfig, fine_tune  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TUNES = {"default (refit)": FineTuneConfig(), "gradient steps (refit_linear=False)": FineTuneConfig(refit_linear=False)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="stackoverflow20", help="an intent data config (configs/data)")
    p.add_argument("--new", default="wordpress", help="the expert left out of training and added")
    p.add_argument("--datasets-dir", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--smoke", action="store_true", help="demo data, hashing embedder, one epoch: seconds")
    args = p.parse_args()
    quiet_libraries()
    overrides = [f"data={args.data}", f"datasets_dir={args.datasets_dir}", f"seed={args.seed}"]
    cache = default_cache_dir()
    if args.smoke:
        work = Path(tempfile.mkdtemp(prefix="add-intent-smoke-"))
        args.data, args.new, cache = "demo", "security", work / "embeddings"
        overrides = ["data=demo", "embedder=hashing", "trainer.max_epochs=1", "linear_weight=1", "seed=0"]
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "trainer.enable_progress_bar=false"])
    ds = instantiate(cfg.data)
    key = ds.expert_key
    if args.new not in ds.experts:
        raise SystemExit(f"--new {args.new!r} is not an expert of {args.data}; its experts: {ds.experts}")
    emb = CachedEmbedder(instantiate(cfg.embedder), cache)
    kept = [r for r in ds.records if not (r.split in ("train", "val") and getattr(r, key) == args.new)]
    trained, took = full_train(TextDataset(ds.name, kept, key), emb, args.seed, overrides, calibrate=True)
    train_seconds = took.seconds
    path = trained.save(Path(tempfile.mkdtemp(prefix="add-intent-ckpt-")) / "router")

    test = ds.split("test")
    xq = emb.encode([r.text for r in test])
    experts = np.array([getattr(r, key) for r in test])
    old, new = experts != args.new, experts == args.new
    texts = [r.text for r in ds.split("train") if getattr(r, key) == args.new]

    def measured(router: Router) -> dict[str, float]:
        index = {n: i for i, n in enumerate(router.expert_names)}
        gold = np.array([index.get(e, -1) for e in experts])
        probs = router.gate_probs(xq)
        out = {
            "old acc@1": accuracy_at_k(probs[old], gold[old], 1),
            "old acc@2": accuracy_at_k(probs[old], gold[old], 2),
        }
        if args.new in index and new.any():
            out["new acc@1"] = accuracy_at_k(probs[new], gold[new], 1)
        return out

    rows = {"before the add": measured(Router.load(path, cache_dir=cache))}
    tunes = {}
    for name, tune in TUNES.items():
        router = Router.load(path, cache_dir=cache)
        router.add_expert(args.new, texts=texts)
        rows["after add_expert"] = measured(router)
        result = fine_tune(router, [args.new], tune)
        rows[f"+ fine_tune, {name}"] = measured(router)
        tunes[name] = {
            "seconds": result.seconds,
            "refit_linear": result.refit_linear,
            "kept_old_gate": result.kept_old_gate,
        }
    print(
        f"\n{args.data}: {args.new!r} left out and added ({len(texts)} train texts; {int(new.sum())} of its test "
        f"queries, {int(old.sum())} of the other experts'); router trained in {train_seconds:.0f} s, "
        f"linear head: {trained.gate.linear_head}, {len(trained.calibration)} judged queries kept\n"
    )
    print("| stage | old acc@1 | old acc@2 | new acc@1 |\n|---|---|---|---|")
    for stage, r in rows.items():
        cells = [f"{r['old acc@1']:.4f}", f"{r['old acc@2']:.4f}", f"{r['new acc@1']:.4f}" if "new acc@1" in r else "-"]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print(
        "\nfine-tunes: "
        + ", ".join(f"{n} {t['seconds']:.1f} s (old gate kept: {t['kept_old_gate']})" for n, t in tunes.items())
    )
    if args.json:
        args.json.write_text(
            json.dumps({"args": {**vars(args), "json": str(args.json)}, "rows": rows, "fine_tunes": tunes}, indent=2)
        )


if __name__ == "__main__":
    main()
