"""Training with PyTorch Lightning: the LightningModule, fit_router and short fine-tunes."""

from moe_router.train.finetune import FineTuneConfig, fine_tune, fine_tune_from_feedback
from moe_router.train.fit import FitResult, fit_router
from moe_router.train.module import GateModule

__all__ = ["FineTuneConfig", "FitResult", "GateModule", "fine_tune", "fine_tune_from_feedback", "fit_router"]
