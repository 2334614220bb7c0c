"""serve(cfg): load the checkpoint, build the app, run uvicorn (one process; see docs/serving.md)."""

from __future__ import annotations

import logging
import sys

import uvicorn
from hydra.utils import instantiate
from omegaconf import DictConfig

from moe_router.logs import quiet_libraries
from moe_router.serving.app import create_app
from moe_router.serving.config import check_exposure
from moe_router.serving.state import RouterState

log = logging.getLogger(__name__)


def serve(cfg: DictConfig) -> None:
    """Serve cfg.ckpt on cfg.host:cfg.port until SIGINT/SIGTERM (in-flight requests finish first)."""
    quiet_libraries()
    auth = instantiate(cfg.auth)
    warning = check_exposure(str(cfg.host), auth)  # before loading anything: an open server is refused at once
    if warning:
        log.warning(warning)
        print(warning, file=sys.stderr, flush=True)
    state = RouterState(cfg.ckpt, cache_dir=cfg.cache_dir, threads=cfg.threads, backend=instantiate(cfg.backend))
    app = create_app(state, batching=instantiate(cfg.batching), limits=instantiate(cfg.limits), auth=auth)
    with state.lease() as snap:
        router = snap.router
    print(
        f"Serving {cfg.ckpt}: {router.num_experts} experts, {router.ntotal} vectors, dim {router.dim}, "
        f"{router.backend}, on http://{cfg.host}:{cfg.port} (OpenAPI at /docs)",
        flush=True,
    )
    try:
        uvicorn.run(
            app,
            host=cfg.host,
            port=int(cfg.port),
            log_level=cfg.log_level,
            access_log=cfg.access_log,
            timeout_graceful_shutdown=cfg.graceful_shutdown_s,
        )
    finally:
        state.close()
