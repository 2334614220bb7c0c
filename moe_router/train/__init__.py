"""Training: routers from data, targets, the LightningModule, fit_router, calibration, fine-tunes, train_router.

Names are imported on first use (moe_router.lazy): building a router from data needs no Lightning.
"""

from moe_router.lazy import lazy_exports

_EXPORTS = {
    "FineTuneConfig": "moe_router.train.finetune",
    "fine_tune": "moe_router.train.finetune",
    "fine_tune_from_feedback": "moe_router.train.finetune",
    "FitResult": "moe_router.train.fit",
    "fit_router": "moe_router.train.fit",
    "GateModule": "moe_router.train.module",
    "router_from_dataset": "moe_router.train.build",
    "clustered_router": "moe_router.train.build",
    "calibrate_router": "moe_router.train.calibrate",
    "TargetsConfig": "moe_router.train.pipeline",
    "TrainConfig": "moe_router.train.pipeline",
    "TrainResult": "moe_router.train.pipeline",
    "train_router": "moe_router.train.pipeline",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
