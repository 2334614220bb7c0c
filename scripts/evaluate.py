"""Evaluate a checkpoint against the baselines.

python scripts/evaluate.py ckpt=checkpoints/clinc150 data=clinc150 report=/tmp/r.json
"""

import hydra
from omegaconf import DictConfig

from moe_router.apps.evaluate import evaluate_checkpoint


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    r = evaluate_checkpoint(cfg)
    print(f"\n{r['dataset']} {r['split']}: {r['queries']} queries, {r['experts']} experts, {r['vectors']} vectors")
    if r.get("kind") == "retrieval":
        for key in (
            "source_acc@1",
            "ndcg@10@1",
            "ndcg@10@2",
            "ndcg@10@adaptive",
            "sources@adaptive",
            "ndcg@10@exhaustive",
            "ndcg@10@oracle",
            "recall@100@adaptive",
            "ece",
        ):
            print(f"  {key:<20} {r[key]:.4f}")
        print(f"Tables and plots: {r['out_dir']}/ (table.md, report.json, frontier.png)")
        return
    for key in (
        "acc@1",
        "acc@2",
        *(f"recall@{cfg.k}@{t}" for t in cfg.experts_searched),
        *(f"scanned@{t}" for t in cfg.experts_searched),
    ):
        if key in r:
            print(f"  {key:<14} {r[key]:.4f}")
    load = r["load@1"]
    print(f"  load@1         max/mean {load['max_over_mean']:.2f}, cv {load['cv']:.2f}, dead {load['dead']}")
    print(f"  ECE            {r['calibration']['calibrated']['ece']:.4f} (T = {r['calibration']['temperature']:.3f})")
    if "out_of_scope" in r:
        print(f"  OOS AUROC      {r['routers']['gate (ours)']['oos_auroc']:.4f}")
    for s in r["speed"].values():
        print(
            f"  batch {s['batch']:<8} routed {s['routed_qps']:.0f} q/s vs exhaustive {s['exhaustive_qps']:.0f} q/s "
            f"({s['speedup']:.2f}x, same run); gate {100 * s['gate_share']:.1f}% of routed time"
        )
    if cfg.out_dir:
        print(
            f"Tables and plots: {cfg.out_dir}/ "
            "(table.md, report.json, recall.png, frontier.png, load.png, reliability.png)"
        )
    if cfg.report:
        print(f"Report: {cfg.report}")


if __name__ == "__main__":
    main()
