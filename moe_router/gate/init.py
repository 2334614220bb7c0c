"""A gate's starting point for a set of experts: prototypes from their vectors, or a head at their centroids."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from moe_router.gate.model import Gate
from moe_router.index.expert import Expert, centroids


def initial_gate(experts: Sequence[Expert], seed: int = 0, **gate_kwargs: Any) -> Gate:
    """A fresh gate over `experts` (in routing order), trainable and already a working router.

    A prototype gate (prototypes_per_expert > 0) starts with k-means prototypes of each expert's
    vectors; otherwise the head points at each expert's centroid (a centroid router).
    """
    if not experts:
        raise ValueError("the router has no experts yet; add experts before building a gate")
    gate = Gate(experts[0].dim, len(experts), **gate_kwargs)
    if gate.prototypes_per_expert:
        return with_prototypes(gate, experts, seed)
    gate.init_head_from_centroids(torch.from_numpy(centroids(experts)))
    return gate.eval()


def with_prototypes(gate: Gate, experts: Sequence[Expert], seed: int = 0) -> Gate:
    """`gate` (a copy) with k-means prototypes of each expert's vectors, if it is a prototype gate."""
    if gate.dim != experts[0].dim or gate.num_experts != len(experts):
        raise ValueError(
            f"the gate has dim {gate.dim} and {gate.num_experts} outputs; "
            f"the experts need dim {experts[0].dim} and {len(experts)}"
        )
    out = copy.deepcopy(gate)
    if out.prototypes_per_expert:
        m = out.prototypes_per_expert
        out.init_prototypes([torch.from_numpy(e.prototypes(m, seed + i)) for i, e in enumerate(experts)])
    return out.eval()
