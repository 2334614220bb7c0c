"""Train a router: python scripts/train.py [data=clinc150] [out=checkpoints/clinc150] [overrides...]"""

import hydra
from omegaconf import DictConfig

from moe_router.apps.train import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    summary = train(cfg)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary.metrics.items())
    kept = " (no epoch beat the untrained prototype gate on validation: it was kept)" if summary.untrained_kept else ""
    print(
        f"\nTrained a gate over {summary.experts} experts ({summary.vectors} vectors) "
        f"in {summary.fit_seconds:.1f} s ({summary.epochs} epochs; {summary.total_seconds:.1f} s in all).\n"
        f"Best validation: {metrics}{kept}\n"
        f"Checkpoint: {summary.out}"
    )


if __name__ == "__main__":
    main()
