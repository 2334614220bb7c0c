"""The gate: the routing network (model), its surgery when experts change, and calibration."""

from moe_router.gate.model import Gate, GateOutput, balance_loss, z_loss

__all__ = ["Gate", "GateOutput", "balance_loss", "z_loss"]
