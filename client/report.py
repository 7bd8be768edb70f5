"""What one ``load`` did: phase timings and byte counts.

The phases add up to the total: every moment of a load is charged to exactly
one phase by a :class:`PhaseClock`, except where a sink runs two phases at
once (a CUDA ring reads the next file while it copies this one to the device):
it charges each phase its own busy time and the time both ran to
``overlap_s``, so ``import + resolve + fetch + read + h2d + cast - overlap``
is the total.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["PHASES", "LoadReport", "Phase", "PhaseClock"]

Phase = Literal["import", "resolve", "fetch", "read", "h2d", "cast", "consumer"]
#: the phases that make up ``total_s`` (``consumer`` is the caller's time, outside it)
PHASES: tuple[Phase, ...] = ("import", "resolve", "fetch", "read", "h2d", "cast")


@dataclass
class LoadReport:
    ref: str = ""
    revision: str = ""
    device: str = "cpu"
    #: "embedded" (pulled in this process) or "daemon"
    mode: str = "embedded"
    #: how tensors reached the device: "mmap" (copy-on-write views of the cached
    #: files), "read" (read into private memory), a device sink's own name
    sink: str = "mmap"
    cache_hit: bool = False
    files: int = 0
    tensors: int = 0
    #: tensor bytes read from the cached files (only the selected tensors)
    bytes_read: int = 0
    #: bytes this load made the origin send (0 on a cache hit)
    origin_bytes: int = 0
    #: bytes the daemon took from peer daemons for this load (verified)
    peer_bytes: int = 0
    #: where the bytes came from: "cache", "origin", "peer" or "origin+peer" (the
    #: daemon's word; "" in embedded mode: see origin_bytes)
    source: str = ""
    #: bytes already in the cache from another model or revision (deduplicated)
    reused_bytes: int = 0
    #: bytes another request or process pulled while this load waited for it
    coalesced_bytes: int = 0
    #: verified bytes of an interrupted pull that were kept, not fetched again
    resumed_bytes: int = 0
    retries: int = 0
    #: importing torch, when this call was the first to need it
    import_s: float = 0.0
    #: the arguments, the configuration, and the ref's revision (the daemon's own measure)
    resolve_s: float = 0.0
    #: the rest of making the ref local as this worker waited for it (round trips,
    #: a pull or a wait for someone else's), and ending the lease
    fetch_s: float = 0.0
    #: opening the files, their headers, and the tensor bytes into host memory
    #: (on the mmap sink: the mapping; pages arrive when first touched)
    read_s: float = 0.0
    #: host-to-device copies and the final synchronisation
    h2d_s: float = 0.0
    #: time counted in both read_s and h2d_s because a sink ran them at once
    overlap_s: float = 0.0
    #: ``dtype=`` conversions
    cast_s: float = 0.0
    #: ``iter_load`` only: time the caller spent between two tensors; not in total_s
    consumer_s: float = 0.0
    #: the load's wall time, less consumer_s
    total_s: float = 0.0

    @property
    def phases_s(self) -> float:
        """The phases summed, overlap counted once: equal to ``total_s`` up to clock noise."""
        return (
            self.import_s
            + self.resolve_s
            + self.fetch_s
            + self.read_s
            + self.h2d_s
            + self.cast_s
            - self.overlap_s
        )

    @property
    def read_gbps(self) -> float:
        """Tensor bytes over the read and host-to-device phases (overlap counted once), in GB/s.

        On the mmap sink the read phase maps the files (pages arrive when first
        touched), so this is a mapping rate there, not a transfer rate.
        """
        seconds = self.read_s + self.h2d_s - self.overlap_s
        return self.bytes_read / seconds / 1e9 if seconds > 0 else 0.0

    def line(self) -> str:
        """The one log line of a load."""
        return (
            f"load.done ref={self.ref} revision={self.revision[:16]} device={self.device} "
            f"mode={self.mode} sink={self.sink} hit={self.cache_hit} files={self.files} "
            f"tensors={self.tensors} bytes={self.bytes_read} origin_bytes={self.origin_bytes} "
            f"peer_bytes={self.peer_bytes} source={self.source or '-'} "
            f"coalesced_bytes={self.coalesced_bytes} reused_bytes={self.reused_bytes} "
            f"import_s={self.import_s:.3f} resolve_s={self.resolve_s:.3f} "
            f"fetch_s={self.fetch_s:.3f} read_s={self.read_s:.3f} h2d_s={self.h2d_s:.3f} "
            f"overlap_s={self.overlap_s:.3f} cast_s={self.cast_s:.3f} "
            f"total_s={self.total_s:.3f} gbps={self.read_gbps:.2f}"
        )

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["read_gbps"] = self.read_gbps
        return doc


class PhaseClock:
    """Charges the time since the last charge to one phase of a report.

    Called at the end of each stretch of work with the phase it belonged to, it
    leaves no moment uncounted and none counted twice.
    """

    def __init__(self, report: LoadReport, started: float | None = None) -> None:
        self.report = report
        self.started = time.perf_counter() if started is None else started
        self._last = self.started

    def charge(self, phase: Phase) -> float:
        """Add the time since the last charge to ``phase``; return it."""
        now = time.perf_counter()
        elapsed = now - self._last
        self._last = now
        attr = f"{phase}_s"
        setattr(self.report, attr, getattr(self.report, attr) + elapsed)
        return elapsed

    def finish(self, phase: Phase) -> None:
        """Charge the rest to ``phase`` and set ``total_s``."""
        self.charge(phase)
        self.report.total_s = self._last - self.started - self.report.consumer_s
