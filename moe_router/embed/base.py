"""The Embedder interface: texts in, (n, d) float32 L2-normalised rows out; checked texts."""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np



@runtime_checkable
class Embedder(Protocol):
    name: str  # identifies the model; part of the cache key
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, L2-normalised rows."""
        ...

    def spec(self) -> dict[str, Any]:
        """{'type': registered name, **constructor arguments}."""
        ...


def check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, got a single str")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ValueError(f"text {i} is {type(t).__name__}, expected str")
        if not t.strip():
            raise ValueError(f"text {i} is empty; expected non-empty text to embed")
    return out

