"""The server's settings, one small dataclass per concern; configs/serve.yaml builds them with `_target_`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching: concurrent queries share one gate pass and one grouped FAISS pass."""

    enabled: bool = True  # False: every request runs on its own, in the thread pool
    max_batch: int = 256  # queries per pass; a request is never split, so one request may exceed it alone
    max_wait_ms: float = 1.0  # how long a batch's first query waits for company
    max_queue: int = 4096  # queries waiting for a pass; past it requests get 503 (backpressure)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            raise ValueError(f"batching needs max_batch >= 1, max_queue >= 1 and max_wait_ms >= 0, got {self}")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for; anything past them is a 4xx, never work."""

    max_body_bytes: int = 4 << 20  # request body; a 256 x 384 vector batch as JSON is about 2.5 MB
    max_queries: int = 256  # queries (texts or vectors) per request
    max_text_chars: int = 4096  # characters per query or expert text
    max_k: int = 1000  # hits per query
    max_expert_vectors: int = 100_000  # vectors or texts in one POST /experts

    def __post_init__(self) -> None:
        if min(self.max_body_bytes, self.max_queries, self.max_text_chars, self.max_k, self.max_expert_vectors) < 1:
            raise ValueError(f"every limit must be >= 1, got {self}")


@dataclass(frozen=True)
class AuthConfig:
    """Optional shared API key, sent in the X-API-Key header."""

    api_key: str | None = None  # None: no key needed anywhere
    protect_reads: bool = False  # True: route/search/experts/stats need the key too; health/ready never do

    def __post_init__(self) -> None:
        if self.api_key is not None and not str(self.api_key).strip():
            raise ValueError("auth.api_key is empty; set a real key or null to turn the key off")
