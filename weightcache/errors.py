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


class CacheIOError(WeightcacheError):
    """The cache's file system failed a read or write for a reason other than a full
    disk (EIO, a read-only remount, permissions): nothing was committed."""

    code = "cache_io_error"
    http_status = 500


class OriginUnavailable(WeightcacheError):
    """The origin could not be reached or kept failing after every retry."""

    code = "origin_unavailable"
    http_status = 503
    retryable = True


class OriginHostUnknown(WeightcacheError):
    """The origin's host name does not resolve: a wrong endpoint or broken DNS, so
    the request fails at once instead of being retried as a busy origin would be."""

    code = "origin_host_unknown"
    http_status = 502


class OriginDenied(WeightcacheError):
    """The origin refused our credentials."""

    code = "origin_denied"
    http_status = 502


class OriginRejected(WeightcacheError):
    """The origin refused a request for a reason retrying will not fix (a 4xx)."""

    code = "origin_rejected"
    http_status = 502


class OriginRangeInvalid(WeightcacheError):
    """The origin answered a ranged GET with something other than that range (it
    ignored ``Range``, or sent another ``Content-Range``): chunked pulls cannot work."""

    code = "origin_range_invalid"
    http_status = 502


class DaemonUnavailable(WeightcacheError):
    """No daemon answered at the configured socket or URL."""

    code = "daemon_unavailable"
    http_status = 503
    retryable = True


# -- daemon and API ------------------------------------------------------------


class ResponseInvalid(WeightcacheError):
    """The daemon answered, but not with the document the client expected (another
    version, a proxy in between, a bug): nothing was retried or changed."""

    code = "response_invalid"
    http_status = 502


class UnsupportedMediaType(WeightcacheError):
    """A request to a route that reads a JSON body (every POST, and ``DELETE
    /v1/models``) that does not declare ``Content-Type: application/json``, with or
    without a body: what a browser may send cross-site without asking first."""

    code = "unsupported_media_type"
    http_status = 415


class RequestTimeout(WeightcacheError):
    """A request body that did not arrive in time after its headers (a client that
    stalls or trickles it): the daemon answers and closes the connection."""

    code = "request_timeout"
    http_status = 408
    retryable = True


class RequestInvalid(WeightcacheError):
    """A request the API cannot accept: malformed JSON, wrong types, unknown fields."""

    code = "request_invalid"
    http_status = 400


class Unauthorized(WeightcacheError):
    """An admin or peer route over TCP without the configured bearer token."""

    code = "unauthorized"
    http_status = 401


class NotFound(WeightcacheError):
    """No such route, job, lease or blob."""

    code = "not_found"
    http_status = 404


class PayloadTooLarge(WeightcacheError):
    """A request body or header beyond the daemon's limit."""

    code = "payload_too_large"
    http_status = 413


class ModelLeased(WeightcacheError):
    """Evicting a model that a live client holds a lease on (use force to override)."""

    code = "model_leased"
    http_status = 409


class TooManyLeases(WeightcacheError):
    """A client holds more leases than ``daemon.max_leases_per_client``."""

    code = "too_many_leases"
    http_status = 429
    retryable = True


class Overloaded(WeightcacheError):
    """The daemon's queue of pending pulls is full; retry after ``retry_after_s``."""

    code = "overloaded"
    http_status = 503
    retryable = True

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **facts: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **facts)
        self.retry_after_s = retry_after_s


class ShuttingDown(WeightcacheError):
    """The daemon is stopping and takes no new work."""

    code = "shutting_down"
    http_status = 503
    retryable = True


class PeerBusy(OriginUnavailable):
    """A peer cannot give a chunk now (it is coming from another peer, another
    process holds the blob, or it did not arrive in ``peers.wait_s``): ask the next."""

    code = "peer_busy"
    http_status = 503
    retryable = True


class PeerIsSelf(WeightcacheError):
    """A peer request reached the daemon that sent it (its own URL in the peer list
    under another name): the sender learns the URL is itself."""

    code = "peer_is_self"
    http_status = 409


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
    CacheIOError,
    OriginUnavailable,
    OriginHostUnknown,
    OriginDenied,
    OriginRejected,
    OriginRangeInvalid,
    DaemonUnavailable,
    ResponseInvalid,
    UnsupportedMediaType,
    RequestTimeout,
    RequestInvalid,
    Unauthorized,
    NotFound,
    PayloadTooLarge,
    ModelLeased,
    TooManyLeases,
    Overloaded,
    ShuttingDown,
    PeerBusy,
    PeerIsSelf,
)

BY_CODE: dict[str, type[WeightcacheError]] = {cls.code: cls for cls in ALL_ERRORS}


def from_dict(body: dict[str, Any], status: int = 500) -> WeightcacheError:
    """Rebuild the error a daemon sent (``{"code", "message", "hint", "details"}``).

    The client raises the same class the daemon raised; an unknown code becomes
    the root class, keeping the code and message.
    """
    code = str(body.get("code", "internal"))
    cls = BY_CODE.get(code, WeightcacheError)
    message = str(body.get("message", f"daemon error {status}"))
    details = body.get("details") if isinstance(body.get("details"), dict) else {}
    hint = body.get("hint") if isinstance(body.get("hint"), str) else None
    err = cls.__new__(cls)
    WeightcacheError.__init__(err, message, hint=hint, **(details or {}))
    if cls is ConfigInvalid:
        err.problems = list(details.get("problems", [message])) if details else [message]  # type: ignore[attr-defined]
    if cls is Overloaded:
        err.retry_after_s = float((details or {}).get("retry_after_s", 1.0))  # type: ignore[attr-defined]
    if cls is WeightcacheError and code != "internal":
        err.code = code  # type: ignore[misc]
    return err
