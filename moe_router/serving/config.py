"""The server's settings, one small dataclass per concern; configs/serve.yaml builds them with `_target_`."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching: concurrent queries share one gate pass and one grouped FAISS pass."""

    enabled: bool = True  # False: every request runs on its own, in the thread pool
    max_batch: int = 256  # queries per pass; a request is never split, so one request may exceed it alone
    max_wait_ms: float = 1.0  # how long a batch's first query waits for company
    max_queue: int = 4096  # queries waiting for a pass; past it requests get 503 (backpressure)
    busy_pass: int = 16  # a pass of at least this many queries is busy: the next may wait for company (busy_wait)
    busy_wait: float = 1.0  # after a busy pass, wait up to this x its duration for its queries to come back

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_wait_ms < 0 or self.busy_pass < 1 or self.busy_wait < 0:
            raise ValueError(
                "batching needs max_batch >= 1, max_queue >= 1, max_wait_ms >= 0, busy_pass >= 1 and "
                f"busy_wait >= 0, got {self}"
            )


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


def normalise_origin(origin: str) -> str:
    """A browser Origin as compared here: 'null', or lower-case scheme://host[:port] with no path."""
    origin = origin.strip().lower().rstrip("/")
    if origin == "null":
        return origin
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise ValueError(
            f"an origin is scheme://host[:port] (e.g. https://app.example.com:8443) or 'null', got {origin!r}"
        )
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class AuthConfig:
    """Who may drive the server: an optional shared API key (X-API-Key header) and the browser origins allowed.

    Whatever the key, a POST must declare `Content-Type: application/json` (else 415) and a request
    that changes something (POST, DELETE) from a web page of another origin is refused (403): a
    cross-site page can send a "simple" text/plain POST without any preflight, but not that.
    """

    api_key: str | None = None  # None: no key needed anywhere
    protect_reads: bool = False  # True: route/search/experts/stats need the key too; health/ready never do
    allowed_origins: Sequence[str] = ()  # browser origins besides the server's own allowed to POST/DELETE
    allow_open_network: bool = False  # True: start on a non-loopback host without api_key (warns loudly)

    def __post_init__(self) -> None:
        if self.api_key is not None and not str(self.api_key).strip():
            raise ValueError("auth.api_key is empty; set a real key or null to turn the key off")
        if isinstance(self.allowed_origins, str):
            raise ValueError(f"auth.allowed_origins must be a list of origins, got the str {self.allowed_origins!r}")
        object.__setattr__(self, "allowed_origins", tuple(normalise_origin(str(o)) for o in self.allowed_origins))


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback addresses; any other name may resolve to a public interface."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, auth: AuthConfig) -> str | None:
    """Refuse (ValueError) to serve a non-loopback host without an API key unless auth.allow_open_network.

    Returns the warning to log when it is allowed open, else None. Without a key, anyone who can reach
    the port can add, merge, split and remove experts and write feedback.
    """
    if is_loopback(host) or auth.api_key is not None:
        return None
    risk = (
        f"host={host} is not a loopback address and auth.api_key is not set: anyone who can reach this port "
        "can change the experts and write feedback"
    )
    if not auth.allow_open_network:
        raise ValueError(
            f"refusing to start: {risk}. Set MOE_ROUTER_API_KEY (auth.api_key), or serve on "
            "host=127.0.0.1, or override with auth.allow_open_network=true"
        )
    return f"SECURITY WARNING: {risk} (auth.allow_open_network=true)"
