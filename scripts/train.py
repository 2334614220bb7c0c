"""Train a router: python scripts/train.py [data=clinc150] [out=checkpoints/clinc150] [overrides...]"""

import time

import hydra
from omegaconf import DictConfig

from moe_router.apps.train import train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    result = train(cfg)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.val_metrics.items())
    kept = " (no epoch beat the untrained prototype gate on validation: it was kept)" if result.untrained_kept else ""
    print(
        f"\nTrained a gate over {result.router.num_experts} experts ({result.router.ntotal} vectors) "
        f"in {result.metrics['fit_seconds']:.1f} s "
        f"({result.epochs} epochs; {time.perf_counter() - start:.1f} s in all).\n"
        f"Best validation: {metrics}{kept}\n"
        f"Checkpoint: {cfg.out}"
    )


if __name__ == "__main__":
    main()
