"""What making a revision local returns: :class:`LocalFile` and :class:`Ensured`.

One definition for the node (which builds them), the daemon (which sends them
as JSON) and the client (which reads them back). Standard library only, so a
worker that imports the client pays for nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from weightcache.errors import ResponseInvalid

__all__ = ["Ensured", "LocalFile"]


class Releasable(Protocol):
    def release(self) -> None:
        """End the protection."""


@dataclass(frozen=True, slots=True)
class LocalFile:
    """One file of an ensured revision: its path in the revision and on this node."""

    path: str
    local_path: Path
    size: int
    blake3: str

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "local_path": str(self.local_path),
            "size": self.size,
            "blake3": self.blake3,
        }


@dataclass
class Ensured:
    """A revision made local: where its files are and where the bytes came from.

    ``mode`` (``"daemon"`` or ``"embedded"``), ``source`` and ``lease`` say how
    a client got it; the node leaves them at their defaults.
    """

    ref: str
    revision: str
    snapshot: Path
    files: list[LocalFile]
    cache_hit: bool
    total_bytes: int = 0
    origin_bytes: int = 0
    peer_bytes: int = 0  # chunks from peer daemons (verified)
    reused_bytes: int = 0  # blobs already in the cache (another model, an earlier pull)
    coalesced_bytes: int = 0  # blobs another process pulled while this one waited
    resumed_bytes: int = 0  # verified bytes of an interrupted pull, kept
    retries: int = 0
    resolve_seconds: float = 0.0
    seconds: float = 0.0
    mode: str = "embedded"
    #: "cache", "origin", "peer" or "origin+peer" (from the daemon); empty in embedded mode
    source: str = ""
    #: ``{id, revision, pid, expires}`` while the daemon protects the blobs from eviction
    lease: dict[str, Any] | None = None
    #: the whole JSON document it was read from, for fields this class does not name
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    #: what keeps the files from eviction until released (a daemon lease bound to an
    #: open connection, or this process's use of the revision); see :meth:`release`
    hold: Releasable | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """End the protection this result holds (idempotent)."""
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.release()

    @property
    def lease_id(self) -> str | None:
        if self.lease and self.lease.get("id") is not None:
            return str(self.lease["id"])
        return None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("files", "snapshot", "raw", "mode", "source", "lease", "hold")
        }
        doc["snapshot"] = str(self.snapshot)
        doc["files"] = [f.to_json() for f in self.files]
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, mode: str = "daemon") -> Ensured:
        """Build from the daemon's ``/v1/ensure`` result (or :meth:`to_json`)."""
        try:
            files = [
                LocalFile(
                    path=str(f["path"]),
                    local_path=Path(f["local_path"]),
                    size=int(f["size"]),
                    blake3=str(f["blake3"]),
                )
                for f in doc["files"]
            ]
            lease = doc.get("lease")
            return cls(
                ref=str(doc["ref"]),
                revision=str(doc["revision"]),
                snapshot=Path(doc["snapshot"]),
                files=files,
                cache_hit=bool(doc["cache_hit"]),
                total_bytes=int(doc.get("total_bytes", sum(f.size for f in files))),
                origin_bytes=int(doc.get("origin_bytes", 0)),
                peer_bytes=int(doc.get("peer_bytes", 0)),
                reused_bytes=int(doc.get("reused_bytes", 0)),
                coalesced_bytes=int(doc.get("coalesced_bytes", 0)),
                resumed_bytes=int(doc.get("resumed_bytes", 0)),
                retries=int(doc.get("retries", 0)),
                resolve_seconds=float(doc.get("resolve_seconds", 0.0)),
                seconds=float(doc.get("seconds", 0.0)),
                mode=mode,
                source=str(doc.get("source") or ""),
                lease=dict(lease) if isinstance(lease, Mapping) else None,
                raw=dict(doc),
            )
        except (KeyError, TypeError, ValueError) as exc:
            # A daemon of another version, or a bug on its side: say so plainly.
            raise ResponseInvalid(
                f"the daemon's ensure result is malformed: {type(exc).__name__}: {exc}",
                hint="check that the daemon and the client are the same weightcache version",
            ) from exc
