"""The exception tree.

Every error a user or operator can meet is a leaf of :class:`WeightcacheError`
with a stable snake_case ``code`` (the daemon's JSON error code and the CLI's
message prefix), the HTTP status the daemon answers with, and whether retrying
the same request later may succeed. Errors carry the facts (ref, path, digest,
expected, actual) as attributes and, where an operator can act, a ``hint``.

Third-party exceptions are translated where the library is imported (origin
adapters, the index); builtins are left for programmer errors.
"""

from __future__ import annotations

from typing import Any, ClassVar


class WeightcacheError(Exception):
    """Root of every error weightcache raises on purpose."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, hint: str | None = None, **facts: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.facts: dict[str, Any] = facts

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of an HTTP error: one shape for every failure."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        if self.facts:
            body["details"] = {k: _jsonable(v) for k, v in self.facts.items()}
        return body


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


# -- input ------------------------------------------------------------------


class RefInvalid(WeightcacheError):
    """A model reference that does not parse."""

    code = "ref_invalid"
    http_status = 400


class ConfigInvalid(WeightcacheError):
    """Configuration with one or more problems, each named by a dotted path."""

    code = "config_invalid"
    http_status = 500

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration: " + "; ".join(problems), problems=problems)


class ManifestInvalid(WeightcacheError):
    """A manifest that is malformed or unsafe (paths escaping the prefix, ...)."""

    code = "manifest_invalid"
    http_status = 422


class HeaderInvalid(WeightcacheError):
    """A safetensors header that lies about the file it heads."""

    code = "header_invalid"
    http_status = 422


class DeviceUnavailable(WeightcacheError):
    """The requested device does not exist or is not usable in this process."""

    code = "device_unavailable"
    http_status = 400


# -- lookup -----------------------------------------------------------------


class ModelNotFound(WeightcacheError):
    """No manifest (or no such revision) at the ref's prefix."""

    code = "model_not_found"
    http_status = 404


class TensorNotFound(WeightcacheError):
    """``tensors=`` names a tensor that no file of the model holds."""

    code = "tensor_not_found"
    http_status = 404


class RevisionAmbiguous(WeightcacheError):
    """A revision prefix that matches more than one revision."""

    code = "revision_ambiguous"
    http_status = 409


class ObjectNotFound(WeightcacheError):
    """An object the manifest lists is missing at the origin."""

    code = "object_not_found"
    http_status = 404


# -- integrity --------------------------------------------------------------


class HashMismatch(WeightcacheError):
    """Bytes that do not match the digest the manifest promises."""

    code = "hash_mismatch"
    http_status = 502


class CacheCorrupt(WeightcacheError):
    """The node cache holds something it should not (found by verify)."""

    code = "cache_corrupt"
    http_status = 500


# -- resources --------------------------------------------------------------


class CacheFull(WeightcacheError):
    """Not enough room in the cache for a pull, reserve included."""

    code = "cache_full"
    http_status = 507


class OriginUnavailable(WeightcacheError):
    """The origin could not be reached or kept failing after every retry."""

    code = "origin_unavailable"
    http_status = 503
    retryable = True


class OriginDenied(WeightcacheError):
    """The origin refused our credentials."""

    code = "origin_denied"
    http_status = 502


class OriginRejected(WeightcacheError):
    """The origin refused a request for a reason retrying will not fix (a 4xx)."""

    code = "origin_rejected"
    http_status = 502


class DaemonUnavailable(WeightcacheError):
    """No daemon answered at the configured socket or URL."""

    code = "daemon_unavailable"
    http_status = 503
    retryable = True


ALL_ERRORS: tuple[type[WeightcacheError], ...] = (
    WeightcacheError,
    RefInvalid,
    ConfigInvalid,
    ManifestInvalid,
    HeaderInvalid,
    DeviceUnavailable,
    ModelNotFound,
    TensorNotFound,
    RevisionAmbiguous,
    ObjectNotFound,
    HashMismatch,
    CacheCorrupt,
    CacheFull,
    OriginUnavailable,
    OriginDenied,
    OriginRejected,
    DaemonUnavailable,
)
