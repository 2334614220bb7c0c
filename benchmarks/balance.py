"""Load-balancing sweep: the Switch loss weight alpha vs routing quality and load.

    python benchmarks/balance.py                       # clinc150 domains and 64 k-means experts on stackoverflow20
    python benchmarks/balance.py --alphas 0 0.01 --settings clinc150

Trains one gate per (setting, alpha) through the real Hydra configs, with the default load floor
(calibration lifts experts starving on validation queries), plus one run at alpha = 0.01 without
the floor; evaluates each on the test split; prints a Markdown table (acc@1, recall@10 at 2 experts, max/mean
load, CV, dead experts,
and recall/load under a serving-time capacity factor) and writes it to --out.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

from moe_router.apps.evaluate import evaluate_checkpoint
from moe_router.apps.train import train

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
SETTINGS = {
    "clinc150": ["data=clinc150"],
    "stackoverflow20_kmeans64": ["data=stackoverflow20", "partition=64"],
    # --smoke: the demo corpus, hashed embeddings, one epoch (every step in seconds; the numbers mean nothing)
    "demo_smoke": ["data=demo", "embedder=hashing", "embedder.dim=64", "trainer.max_epochs=1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.001, 0.01, 0.1])
    parser.add_argument(
        "--floors",
        nargs="+",
        default=["0.4", "null"],
        help="load_floor values (null = off); each alpha runs with the first, the default alpha with the rest",
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS)[:2], choices=list(SETTINGS))
    parser.add_argument("--model", default="hybrid", help="model config group (hybrid | mlp)")
    parser.add_argument("--work", default="checkpoints/balance", help="where checkpoints go")
    parser.add_argument("--out", default="reports/balance.md")
    parser.add_argument(
        "--smoke", action="store_true", help="one alpha on the demo corpus, in seconds (the tests run it)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.settings, args.alphas, args.floors = ["demo_smoke"], [0.01], ["0.4"]
        args.work, args.out = tempfile.mkdtemp(prefix="balance-smoke-"), str(Path(tempfile.mkdtemp()) / "balance.md")

    rows = []
    for setting in args.settings:
        runs = [(a, args.floors[0]) for a in args.alphas] + [(0.01, f) for f in args.floors[1:]]
        for alpha, floor in runs:
            ckpt = f"{args.work}/{setting}_a{alpha}_f{floor}"
            with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
                cfg = compose(
                    "train",
                    overrides=[
                        *SETTINGS[setting],
                        f"model={args.model}",
                        f"model.balance_coef={alpha}",
                        f"load_floor={floor}",
                        f"out={ckpt}",
                        "trainer.enable_progress_bar=false",
                    ],
                )
                train(cfg)
                data = [o for o in SETTINGS[setting] if o.startswith("data=")]
                ecfg = compose(
                    "eval", overrides=[*data, f"ckpt={ckpt}", "out_dir=null", "baselines=[]", "speed_batches=[]"]
                )
                r = evaluate_checkpoint(ecfg)
            load = r["load@1"]
            cap = r.get("capacity", {})
            rows.append(
                f"| {setting} | {alpha} | {floor} | {r['acc@1']:.4f} | {r['recall@10@2']:.4f} | "
                f"{load['max_over_mean']:.2f} | {load['cv']:.2f} | {load['dead']} | "
                f"{cap.get('max_over_mean', float('nan')):.2f} | {cap.get('recall@10', float('nan')):.4f} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| setting | alpha | load floor | acc@1 | recall@10@2 | load max/mean | load CV | dead "
            "| capped max/mean (c=1.25) | capped recall@10@2 |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
