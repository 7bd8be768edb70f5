"""What one ``load`` did: phase timings and byte counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class LoadReport:
    ref: str = ""
    revision: str = ""
    device: str = "cpu"
    #: "embedded" (pulled in this process) or "daemon"
    mode: str = "embedded"
    cache_hit: bool = False
    files: int = 0
    tensors: int = 0
    #: tensor bytes read from the cached files (only the selected tensors)
    bytes_read: int = 0
    #: bytes this load made the origin send (0 on a cache hit)
    origin_bytes: int = 0
    #: bytes already in the cache from another model or revision (deduplicated)
    reused_bytes: int = 0
    #: bytes another request or process pulled while this load waited for it
    coalesced_bytes: int = 0
    #: verified bytes of an interrupted pull that were kept, not fetched again
    resumed_bytes: int = 0
    retries: int = 0
    resolve_s: float = 0.0
    fetch_s: float = 0.0
    read_s: float = 0.0
    h2d_s: float = 0.0
    total_s: float = 0.0

    @property
    def read_gbps(self) -> float:
        """Tensor bytes over the read and host-to-device phases, in GB/s.

        On CPU the read phase maps the files (pages arrive when first touched),
        so this is a mapping rate there, not a transfer rate.
        """
        seconds = self.read_s + self.h2d_s
        return self.bytes_read / seconds / 1e9 if seconds > 0 else 0.0

    def line(self) -> str:
        """The one log line of a load."""
        return (
            f"load.done ref={self.ref} revision={self.revision[:16]} device={self.device} "
            f"mode={self.mode} hit={self.cache_hit} files={self.files} tensors={self.tensors} "
            f"bytes={self.bytes_read} origin_bytes={self.origin_bytes} "
            f"coalesced_bytes={self.coalesced_bytes} reused_bytes={self.reused_bytes} "
            f"resolve_s={self.resolve_s:.3f} fetch_s={self.fetch_s:.3f} read_s={self.read_s:.3f} "
            f"h2d_s={self.h2d_s:.3f} total_s={self.total_s:.3f} gbps={self.read_gbps:.2f}"
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["read_gbps"] = self.read_gbps
        return doc
