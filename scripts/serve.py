"""Serve a checkpoint over HTTP: python scripts/serve.py ckpt=checkpoints/demo [port=8000] [overrides...]"""

import hydra
from omegaconf import DictConfig

from moe_router.apps.serve import serve


@hydra.main(version_base="1.3", config_path="../configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
