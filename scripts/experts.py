"""Expert lifecycle on a checkpoint: python scripts/experts.py ckpt=checkpoints/demo op=stats [op=merge merge.a=...]"""

import hydra
from omegaconf import DictConfig

from moe_router.apps.experts import run


@hydra.main(version_base="1.3", config_path="../configs", config_name="experts")
def main(cfg: DictConfig) -> None:
    result = run(cfg)
    print("\n".join(result.lines))


if __name__ == "__main__":
    main()
