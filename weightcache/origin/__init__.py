"""Where bytes come from: one blocking interface (:class:`base.Origin`), one adapter per system."""

from __future__ import annotations

from pathlib import Path

from weightcache.config import Config
from weightcache.origin.base import ObjectInfo, Origin, join_key
from weightcache.refs import Ref

__all__ = ["ObjectInfo", "Origin", "join_key", "open_origin"]


def open_origin(ref: Ref, cfg: Config) -> tuple[Origin, str]:
    """The origin a ref lives in, and the key prefix of the model inside it."""
    if ref.scheme == "file":
        from weightcache.origin.file import FileOrigin

        return FileOrigin(Path(ref.prefix)), ""
    from weightcache.origin.s3 import S3Origin

    origin = S3Origin(
        ref.bucket,
        cfg.s3,
        connect_timeout_s=cfg.fetch.connect_timeout_s,
        read_timeout_s=cfg.fetch.read_timeout_s,
        max_connections=max(16, 2 * cfg.fetch.concurrency),
    )
    return origin, ref.prefix
