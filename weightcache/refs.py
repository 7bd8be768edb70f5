"""Model references: parsing and the identity of an origin prefix.

    ref := s3://BUCKET/PREFIX[@REV] | file:///ABS/PATH[@REV] | NAME[@REV]

``REV`` is a manifest digest or a unique hex prefix of one (at least
:data:`MIN_REV_PREFIX` characters). ``NAME`` is a prefix in the default bucket.
Parsing is a pure function; resolving a revision needs an origin (see
``weightcache.node``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

from weightcache.errors import RefInvalid
from weightcache.hashing import digest_bytes
from weightcache.manifest import path_problem

MIN_REV_PREFIX = 6
MAX_KEY_LEN = 200
MAX_REF_LEN = 2048
_REV = re.compile(rf"[0-9a-f]{{{MIN_REV_PREFIX},64}}")
# S3 bucket naming rules (the subset every S3-compatible store accepts).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True, slots=True)
class Ref:
    """A parsed reference. ``location`` names the prefix, ``rev`` pins a revision."""

    scheme: Literal["s3", "file"]
    bucket: str  # empty for file://
    prefix: str  # S3 key prefix without trailing slash, or an absolute directory
    rev: str | None

    @property
    def location(self) -> str:
        """The origin prefix without revision: what ``refs/`` remembers a revision for."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}"
        return f"file://{self.prefix}"

    @property
    def location_key(self) -> str:
        """``location`` as one safe file name (percent-encoded, no ``/``).

        Names longer than a file system allows become a digest of the location.
        """
        key = quote(self.location, safe="")
        if len(key) > MAX_KEY_LEN:
            return "b3-" + digest_bytes(self.location.encode())
        return key

    def __str__(self) -> str:
        return self.location + (f"@{self.rev}" if self.rev else "")

    def with_rev(self, rev: str) -> Ref:
        return Ref(self.scheme, self.bucket, self.prefix, rev)


def _split_rev(text: str, ref: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    body, _, rev = text.rpartition("@")
    if not _REV.fullmatch(rev):
        raise RefInvalid(
            f"invalid revision {rev!r} in ref {ref!r}: a revision is {MIN_REV_PREFIX} to 64 "
            "lower-case hex characters of a manifest digest",
            ref=ref,
        )
    return body, rev


def _check_prefix(prefix: str, ref: str) -> str:
    prefix = prefix.rstrip("/")
    if not prefix:
        raise RefInvalid(f"ref {ref!r} names no prefix: a model lives under a prefix", ref=ref)
    problem = path_problem(prefix)
    if problem:
        raise RefInvalid(f"invalid prefix in ref {ref!r}: {problem}", ref=ref)
    return prefix


def parse_ref(text: str, *, default_bucket: str = "") -> Ref:
    """Parse a ref; raise :class:`RefInvalid` naming what is wrong."""
    if not isinstance(text, str):
        raise RefInvalid(f"a ref is a string, got {type(text).__name__}", ref=repr(text))
    if not text or len(text) > MAX_REF_LEN:
        raise RefInvalid(f"a ref is 1 to {MAX_REF_LEN} characters long", ref=text[:100])
    try:
        # JSON can carry lone surrogates (\ud800) that no path or URL can.
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RefInvalid("a ref must be valid Unicode text", ref=repr(text[:100])) from None
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise RefInvalid("a ref may not contain control characters", ref=repr(text[:100]))
    if text != text.strip():
        raise RefInvalid(f"ref {text!r} has leading or trailing whitespace", ref=text)

    if text.startswith("s3://"):
        body, rev = _split_rev(text[len("s3://") :], text)
        bucket, _, prefix = body.partition("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise RefInvalid(
                f"invalid bucket {bucket!r} in ref {text!r}: 3-63 characters of a-z, 0-9, '.', '-'",
                ref=text,
            )
        return Ref("s3", bucket, _check_prefix(prefix, text), rev)

    if text.startswith("file://"):
        body, rev = _split_rev(text[len("file://") :], text)
        if not body.startswith("/"):
            raise RefInvalid(
                f"a file ref needs an absolute path (file:///abs/path), got {text!r}", ref=text
            )
        return Ref("file", "", "/" + _check_prefix(body.lstrip("/"), text), rev)

    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise RefInvalid(
            f"unsupported scheme {scheme!r} in ref {text!r}",
            ref=text,
            hint="use s3://BUCKET/PREFIX, file:///ABS/PATH or a bare NAME in the default bucket",
        )

    body, rev = _split_rev(text, text)
    if not default_bucket:
        raise RefInvalid(
            f"bare model name {text!r} needs a default bucket",
            ref=text,
            hint="set s3.default_bucket in the config or WEIGHTCACHE_S3_DEFAULT_BUCKET, "
            "or write the ref as s3://BUCKET/PREFIX",
        )
    return Ref("s3", default_bucket, _check_prefix(body, text), rev)
