"""A model-free deterministic embedder (feature hashing) for tests and demos."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_router.embed.base import check_texts
from moe_router.vectors import check_dim

_TOKEN = re.compile(r"[a-z0-9]+")


class HashingEmbedder:
    """Deterministic feature hashing of words and character trigrams (no model; for tests and demos)."""

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        self.dim = check_dim(dim)
        self.seed = seed
        self.name = f"hashing-{dim}-{seed}"

    def _features(self, text: str) -> list[str]:
        words = _TOKEN.findall(text.lower())
        grams = [f"w:{w}" for w in words]
        for w in words:
            padded = f"#{w}#"
            grams += [f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2)]
        return grams

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for g in self._features(text):
                h = int.from_bytes(hashlib.blake2b(f"{self.seed}:{g}".encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out[:, 0] += norms[:, 0] == 0  # text with no hashable token: a fixed direction, not NaN
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def spec(self) -> dict[str, Any]:
        return {"type": "hashing", "dim": self.dim, "seed": self.seed}
