"""The gate: the routing network (model), its start (init), its surgery when experts change, confidence calibration."""

from moe_router.gate.init import initial_gate, with_prototypes
from moe_router.gate.model import Gate, GateOutput, balance_loss, infer, z_loss

__all__ = ["Gate", "GateOutput", "balance_loss", "infer", "initial_gate", "with_prototypes", "z_loss"]
