"""The Embedder interface: texts in, (n, d) float32 L2-normalised rows out; checked texts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

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


def check_text_list(texts: Any, what: str = "texts") -> list[str]:
    """`texts` as a list of non-empty str that encode as UTF-8, else a ValueError naming `what` and the text.

    A bare str is refused: iterating it would make one text per character.
    """
    if isinstance(texts, str):
        raise ValueError(f"{what} must be a list of strings, got a single str {texts!r:.40} (wrap it: [text])")
    if isinstance(texts, (bytes, dict)) or not isinstance(texts, (Sequence, np.ndarray)):  # a set has no order
        raise ValueError(f"{what} must be a list of strings, got {type(texts).__name__}")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ValueError(f"{what}: text {i} is {type(t).__name__}, expected str")
        if not t.strip():
            raise ValueError(f"{what}: text {i} is empty; expected non-empty text to embed")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from surrogateescape or bad JSON "\ud800"
            raise ValueError(
                f"{what}: text {i} is not valid Unicode (character {exc.start} is a lone surrogate "
                f"{t[exc.start]!r}); expected text that encodes as UTF-8"
            ) from None
    return out


def check_texts(texts: Sequence[str]) -> list[str]:
    """What every embedder's encode() checks first (a TypeError for a bare str, as encode takes a list)."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of texts, got a single str")
    return check_text_list(list(texts), "texts")
