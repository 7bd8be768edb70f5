"""Configuration: frozen dataclasses from TOML, ``WEIGHTCACHE_*`` variables and flags.

This is the only module that reads the environment. Precedence, lowest first:
built-in defaults, the TOML file (``--config`` or ``WEIGHTCACHE_CONFIG``),
``WEIGHTCACHE_<SECTION>_<FIELD>`` variables (``WEIGHTCACHE_CACHE_DIR``,
``WEIGHTCACHE_FETCH_CONCURRENCY``, ...), then explicit overrides (CLI flags).
S3 settings also come from the standard ``AWS_*`` variables (endpoint, region,
keys, session token, profile and its files, web identity, the metadata service),
under the ``WEIGHTCACHE_S3_*`` ones. Secrets never come from the TOML file.

Every problem is collected and reported at once as a dotted path
(``fetch.concurrency: must be >= 1, got 0``) before anything touches the disk
or the network.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import tomllib
import types
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from weightcache.errors import ConfigInvalid

log = logging.getLogger(__name__)
MiB = 1 << 20
GiB = 1 << 30

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_IUNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"16MiB"`` → 16777216, ``"1GB"`` → 10**9, ``"4096"`` → 4096."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 4096, 64MiB, 2GiB)")
    number, unit = int(m.group(1)), (m.group(2) or "").lower()
    if unit.startswith(tuple(_IUNITS)) and "i" in unit:
        return number * _IUNITS[unit[0]]
    return number * _UNITS[unit[:1]]


def _default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    home = env.get("HOME") or os.path.expanduser("~")
    base = env.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    return Path(base) / "weightcache"


@dataclass(frozen=True)
class CacheConfig:
    dir: Path = field(default_factory=_default_cache_dir)
    #: byte budget for blobs; 0 means no budget (the reserve still applies)
    max_bytes: int = 0
    #: free space to leave on the cache's filesystem, whatever the budget says
    reserve_bytes: int = 1 * GiB
    #: a partial download untouched this long is removed by the daemon (a pull
    #: stopped and never asked for again, chunks pulled for peers of a model this
    #: node never loads)
    partial_ttl_s: float = 86400.0


@dataclass(frozen=True)
class FetchConfig:
    #: parallel ranged GETs per blob and in all (per process in embedded mode)
    concurrency: int = 8
    #: origin attempts per chunk on transient faults (429/5xx, resets, short bodies)
    retries: int = 6
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0
    #: re-fetches of a chunk whose bytes fail their BLAKE3 before HashMismatch
    hash_retries: int = 2
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    #: rate limit over all origin reads of this process; 0 means none
    max_bytes_per_s: int = 0


@dataclass(frozen=True)
class PublishConfig:
    #: manifest chunk size: the unit of ranged GETs and of verification
    chunk_bytes: int = 16 * MiB
    #: multipart part size for uploads (S3 minimum 5 MiB)
    part_bytes: int = 64 * MiB


def _aws_file(name: str, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".aws" / name


#: the endpoint used when none is configured
AWS_DEFAULT_ENDPOINT = "https://s3.amazonaws.com"


@dataclass(frozen=True)
class S3Config:
    endpoint_url: str = AWS_DEFAULT_ENDPOINT
    region: str = "us-east-1"
    #: static keys: first in the credential chain; environment only, never the file
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    #: the profile looked up in the shared credentials file, then in the config file
    profile: str = "default"
    shared_credentials_file: Path = field(default_factory=lambda: _aws_file("credentials"))
    config_file: Path = field(default_factory=lambda: _aws_file("config"))
    #: IRSA / web identity: a projected token traded with STS for the role's credentials
    web_identity_token_file: Path | None = None
    role_arn: str = ""
    #: where web identity trades its token (empty: https://sts.REGION.amazonaws.com)
    sts_endpoint: str = ""
    #: CA certificates for the S3 endpoint and STS (default: SSL_CERT_FILE or certifi)
    ca_bundle: Path | None = None
    #: the EC2 instance metadata service, last in the chain (empty: http://169.254.169.254)
    metadata_endpoint: str = ""
    metadata_disabled: bool = False
    metadata_timeout_s: float = 1.0
    #: send requests unsigned, with no credential chain (a public bucket)
    anonymous: bool = False
    #: bucket for bare ``NAME`` refs
    default_bucket: str = ""


@dataclass(frozen=True)
class DaemonConfig:
    #: Unix socket for local workers (default: CACHE_DIR/weightcache.sock); also
    #: where clients look for the daemon (``WEIGHTCACHE_SOCKET``)
    socket_path: Path | None = None
    #: a daemon over TCP for clients that cannot reach the socket (``WEIGHTCACHE_URL``)
    url: str = ""
    #: HOST:PORT to listen on over TCP for admins, peers and Prometheus; empty: off
    listen: str = ""
    #: bearer token required on TCP for admin and blob routes (``WEIGHTCACHE_TOKEN``);
    #: read from the environment or ``token_file`` only, never from the TOML file
    token: str = field(default="", repr=False)
    token_file: Path | None = None
    #: this node's name: seeds the prefetch spread (default: the host name)
    node_name: str = ""
    #: distinct pulls in progress or queued for origin slots before a new one gets
    #: `overloaded` (requests joining a running pull or hitting the cache always pass)
    max_pending: int = 256
    #: a lease not released or renewed ends after this long
    lease_ttl_s: float = 900.0
    max_leases_per_client: int = 64
    #: scheduled prefetches start within this window after their time, spread per node
    prefetch_spread_s: float = 60.0
    #: on SIGTERM, how long in-flight pulls get to checkpoint before they are cancelled
    shutdown_timeout_s: float = 10.0
    #: request bodies beyond this are refused with 413
    max_body_bytes: int = 64 * 1024


@dataclass(frozen=True)
class PrefetchConfig:
    #: a recurring prefetch starts this long before its peak unless told otherwise;
    #: also the lead of the schedules the forecast suggests
    lead_s: float = 900.0
    #: a recurring prefetch holds its model (a pin) this long after its peak unless told
    hold_s: float = 7200.0
    #: the daemon creates the schedules the forecast suggests (within auto_pin_bytes)
    auto: bool = False
    #: bytes the pins of automatic schedules may hold in all; required with auto
    auto_pin_bytes: int = 0
    #: weeks of request history kept per model location, and looked at by the forecast
    history_weeks: int = 4
    #: an hour of the week is a pattern when it had misses in at least this many weeks
    min_weeks: int = 2
    #: the history is written to the index at most this often
    history_write_s: float = 60.0
    #: model locations with a history; the one seen longest ago is dropped beyond it
    history_max_models: int = 1024
    #: the time zone of the history's hours of the week and of suggested schedules
    tz: str = "UTC"


@dataclass(frozen=True)
class PeersConfig:
    #: other daemons' base URLs (``http://10.0.0.7:7878``); this node's own may be
    #: among them and is recognised (``WEIGHTCACHE_PEERS_URLS``: comma-separated)
    urls: tuple[str, ...] = ()
    #: or a name resolved every ``refresh_s`` to the peers' addresses (a headless
    #: Service in Kubernetes), each reached on ``port``
    dns: str = ""
    port: int = 7878
    refresh_s: float = 30.0
    #: an owner holds a request for a chunk it is still pulling this long
    wait_s: float = 60.0
    #: a peer that sends no byte for this long is slow: the chunk goes elsewhere
    timeout_s: float = 10.0
    connect_timeout_s: float = 2.0
    #: a peer that could not be reached (or was slow) is skipped this long
    down_s: float = 15.0
    #: a peer that sent a wrong byte is avoided this long
    avoid_s: float = 600.0
    #: chunk transfers from peers at once (slots of their own: see docs/operations.md)
    concurrency: int = 8

    @property
    def enabled(self) -> bool:
        return bool(self.urls or self.dns)


@dataclass(frozen=True)
class Config:
    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    s3: S3Config = field(default_factory=S3Config)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)

    @property
    def socket_path(self) -> Path:
        return self.daemon.socket_path or self.cache.dir / "weightcache.sock"


_SECTIONS: dict[str, type[Any]] = {
    "cache": CacheConfig,
    "fetch": FetchConfig,
    "publish": PublishConfig,
    "s3": S3Config,
    "daemon": DaemonConfig,
    "prefetch": PrefetchConfig,
    "peers": PeersConfig,
}
# Secrets are only taken from the environment, never from the TOML file, so that
# a config file can be shared and committed.
_SECRET_FIELDS = {
    ("s3", "access_key_id"),
    ("s3", "secret_access_key"),
    ("s3", "session_token"),
    ("daemon", "token"),
}
# Short names the client side documents (SPEC: WEIGHTCACHE_SOCKET / WEIGHTCACHE_URL).
_ALIASES = {
    "WEIGHTCACHE_SOCKET": ("daemon", "socket_path"),
    "WEIGHTCACHE_URL": ("daemon", "url"),
    "WEIGHTCACHE_TOKEN": ("daemon", "token"),
}
# Applied in this order, so a later name wins: AWS_ENDPOINT_URL_S3 over
# AWS_ENDPOINT_URL and AWS_REGION over AWS_DEFAULT_REGION, as in the AWS SDKs.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ("s3", "access_key_id"),
    "AWS_SECRET_ACCESS_KEY": ("s3", "secret_access_key"),
    "AWS_SESSION_TOKEN": ("s3", "session_token"),
    "AWS_ENDPOINT_URL": ("s3", "endpoint_url"),
    "AWS_ENDPOINT_URL_S3": ("s3", "endpoint_url"),
    "AWS_DEFAULT_REGION": ("s3", "region"),
    "AWS_REGION": ("s3", "region"),
    "AWS_PROFILE": ("s3", "profile"),
    "AWS_SHARED_CREDENTIALS_FILE": ("s3", "shared_credentials_file"),
    "AWS_CONFIG_FILE": ("s3", "config_file"),
    "AWS_WEB_IDENTITY_TOKEN_FILE": ("s3", "web_identity_token_file"),
    "AWS_ROLE_ARN": ("s3", "role_arn"),
    "AWS_ENDPOINT_URL_STS": ("s3", "sts_endpoint"),
    "AWS_CA_BUNDLE": ("s3", "ca_bundle"),
    "AWS_EC2_METADATA_SERVICE_ENDPOINT": ("s3", "metadata_endpoint"),
    "AWS_EC2_METADATA_DISABLED": ("s3", "metadata_disabled"),
    "AWS_METADATA_SERVICE_TIMEOUT": ("s3", "metadata_timeout_s"),
}
#: WEIGHTCACHE_* variables that are not options but are still ours
_OTHER_ENV = {"WEIGHTCACHE_CONFIG"}


def _field_type(section: type[Any], name: str) -> Any:
    hint = get_type_hints(section)[name]
    if get_origin(hint) in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    return hint


def _coerce(value: Any, hint: Any, name: str, from_text: bool) -> Any:
    if get_origin(hint) is tuple:
        # A list of strings: a TOML array, or comma-separated text from a variable.
        if isinstance(value, str) and from_text:
            return tuple(item.strip() for item in value.split(",") if item.strip())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ValueError(f"must be a list of strings, got {value!r}")
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty path string")
        return Path(os.path.expanduser(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return str(value).lower() in ("1", "true", "yes", "on")
        raise ValueError(f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and name.endswith(("_bytes", "_bytes_per_s")):
            return parse_size(value)
        if isinstance(value, str) and from_text:
            with suppress(ValueError):
                return int(value)
        raise ValueError(f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str) and from_text:
            with suppress(ValueError):
                return float(value)
        raise ValueError(f"must be a number, got {value!r}")
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r}")  # programmer error


def _zone_ok(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _check(cfg: Config) -> list[tuple[str, str]]:
    """Range and consistency problems: (dotted path, message) pairs."""
    problems: list[tuple[str, str]] = []

    def need(ok: bool, path: str, why: str, got: Any) -> None:
        if not ok:
            problems.append((path, f"{path}: {why}, got {got!r}"))

    c, f, p = cfg.cache, cfg.fetch, cfg.publish
    need(c.max_bytes >= 0, "cache.max_bytes", "must be >= 0 (0 = no budget)", c.max_bytes)
    need(c.reserve_bytes >= 0, "cache.reserve_bytes", "must be >= 0", c.reserve_bytes)
    need(c.partial_ttl_s > 0, "cache.partial_ttl_s", "must be > 0", c.partial_ttl_s)
    need(1 <= f.concurrency <= 256, "fetch.concurrency", "must be in 1..256", f.concurrency)
    need(0 <= f.retries <= 100, "fetch.retries", "must be in 0..100", f.retries)
    need(0 <= f.hash_retries <= 10, "fetch.hash_retries", "must be in 0..10", f.hash_retries)
    need(f.backoff_base_s > 0, "fetch.backoff_base_s", "must be > 0", f.backoff_base_s)
    need(
        f.backoff_max_s >= f.backoff_base_s,
        "fetch.backoff_max_s",
        "must be >= fetch.backoff_base_s",
        f.backoff_max_s,
    )
    need(f.connect_timeout_s > 0, "fetch.connect_timeout_s", "must be > 0", f.connect_timeout_s)
    need(f.read_timeout_s > 0, "fetch.read_timeout_s", "must be > 0", f.read_timeout_s)
    need(f.max_bytes_per_s >= 0, "fetch.max_bytes_per_s", "must be >= 0", f.max_bytes_per_s)
    need(
        4096 <= p.chunk_bytes <= GiB,
        "publish.chunk_bytes",
        "must be in 4KiB..1GiB",
        p.chunk_bytes,
    )
    need(
        5 * MiB <= p.part_bytes <= 5 * GiB,
        "publish.part_bytes",
        "must be in 5MiB..5GiB",
        p.part_bytes,
    )
    d = cfg.daemon
    need(1 <= d.max_pending <= 100_000, "daemon.max_pending", "must be in 1..100000", d.max_pending)
    need(d.lease_ttl_s > 0, "daemon.lease_ttl_s", "must be > 0", d.lease_ttl_s)
    need(
        1 <= d.max_leases_per_client <= 10_000,
        "daemon.max_leases_per_client",
        "must be in 1..10000",
        d.max_leases_per_client,
    )
    need(d.prefetch_spread_s >= 0, "daemon.prefetch_spread_s", "must be >= 0", d.prefetch_spread_s)
    need(d.shutdown_timeout_s > 0, "daemon.shutdown_timeout_s", "must be > 0", d.shutdown_timeout_s)
    need(
        1024 <= d.max_body_bytes <= 64 * MiB,
        "daemon.max_body_bytes",
        "must be in 1KiB..64MiB",
        d.max_body_bytes,
    )
    if d.listen:
        host, _, port = d.listen.rpartition(":")
        need(
            bool(host) and port.isdigit() and 0 <= int(port) <= 65535,
            "daemon.listen",
            "must be HOST:PORT",
            d.listen,
        )
    if d.url:
        need(
            d.url.startswith(("http://", "https://")),
            "daemon.url",
            "must start with http:// or https://",
            d.url,
        )
    pf = cfg.prefetch
    need(pf.lead_s > 0, "prefetch.lead_s", "must be > 0", pf.lead_s)
    need(pf.hold_s >= 0, "prefetch.hold_s", "must be >= 0", pf.hold_s)
    need(pf.auto_pin_bytes >= 0, "prefetch.auto_pin_bytes", "must be >= 0", pf.auto_pin_bytes)
    need(
        not pf.auto or pf.auto_pin_bytes > 0,
        "prefetch.auto_pin_bytes",
        "must be > 0 when prefetch.auto is on (the bytes automatic schedules may pin)",
        pf.auto_pin_bytes,
    )
    need(
        1 <= pf.history_weeks <= 52, "prefetch.history_weeks", "must be in 1..52", pf.history_weeks
    )
    need(
        1 <= pf.min_weeks <= pf.history_weeks,
        "prefetch.min_weeks",
        "must be in 1..prefetch.history_weeks",
        pf.min_weeks,
    )
    need(pf.history_write_s > 0, "prefetch.history_write_s", "must be > 0", pf.history_write_s)
    need(
        1 <= pf.history_max_models <= 100_000,
        "prefetch.history_max_models",
        "must be in 1..100000",
        pf.history_max_models,
    )
    need(_zone_ok(pf.tz), "prefetch.tz", "must be an IANA time zone such as UTC", pf.tz)
    _check_peers(cfg.peers, need)
    s3 = cfg.s3
    need(
        s3.endpoint_url.startswith(("http://", "https://")),
        "s3.endpoint_url",
        "must start with http:// or https://",
        s3.endpoint_url,
    )
    if bool(s3.access_key_id) != bool(s3.secret_access_key):
        # Never echo a key: name the variables instead.
        missing = "secret_access_key" if s3.access_key_id else "access_key_id"
        problems.append(
            (
                f"s3.{missing}",
                f"s3.{missing}: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together, "
                "only one is set",
            )
        )
    if s3.sts_endpoint:
        need(
            s3.sts_endpoint.startswith(("http://", "https://")),
            "s3.sts_endpoint",
            "must start with http:// or https://",
            s3.sts_endpoint,
        )
    if s3.metadata_endpoint:
        need(
            s3.metadata_endpoint.startswith(("http://", "https://")),
            "s3.metadata_endpoint",
            "must start with http:// or https://",
            s3.metadata_endpoint,
        )
    need(
        0 < s3.metadata_timeout_s <= 60,
        "s3.metadata_timeout_s",
        "must be in (0, 60]",
        s3.metadata_timeout_s,
    )
    return problems


def _check_peers(peers: PeersConfig, need: Callable[[bool, str, str, Any], None]) -> None:
    for url in peers.urls:
        need(_peer_url_ok(url), "peers.urls", "each must be http(s)://HOST:PORT", url)
    need(1 <= peers.port <= 65535, "peers.port", "must be in 1..65535", peers.port)
    for name in ("refresh_s", "wait_s", "timeout_s", "connect_timeout_s", "down_s", "avoid_s"):
        value = getattr(peers, name)
        need(value > 0, f"peers.{name}", "must be > 0", value)
    need(1 <= peers.concurrency <= 256, "peers.concurrency", "must be in 1..256", peers.concurrency)


def _peer_url_ok(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return (
            parts.scheme in ("http", "https")
            and bool(parts.hostname)
            and parts.port is not None
            and parts.path in ("", "/")
            and not parts.query
        )
    except ValueError:
        return False


def _known_env() -> set[str]:
    names = {
        f"WEIGHTCACHE_{s}_{f.name}".upper()
        for s, c in _SECTIONS.items()
        for f in dataclasses.fields(c)
    }
    return names | set(_ALIASES) | _OTHER_ENV


def unknown_env(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``WEIGHTCACHE_*`` variables that are no option: (name, the closest known name)."""
    known = _known_env()
    # Compared without the shared prefix, which would make every name look close.
    tails = {name.removeprefix("WEIGHTCACHE_"): name for name in known}
    out: list[tuple[str, str | None]] = []
    for name in sorted(env):
        if name.startswith("WEIGHTCACHE_") and name not in known:
            tail = name.removeprefix("WEIGHTCACHE_")
            close = difflib.get_close_matches(tail, list(tails), n=5, cutoff=0.6)
            # A name cut short (S3_ENDPOINT for S3_ENDPOINT_URL) beats a mere look-alike.
            close.sort(key=lambda c: not c.startswith(tail))
            out.append((name, tails[close[0]] if close else None))
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective configuration; raise :class:`ConfigInvalid` listing every problem.

    ``overrides`` maps dotted names (``"cache.dir"``) to values from flags. Every
    problem names its dotted path and where the value came from (the file, the
    variable, the command line, or the default), and all of them come in one error:
    a value that does not parse is left at its default for the range checks, whose
    problems on the same path are then not repeated.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    bad_paths: set[str] = set()
    values: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    sources: dict[str, str] = {}

    def put(section: str, name: str, raw: Any, origin: str, from_text: bool) -> None:
        cls = _SECTIONS[section]
        dotted = f"{section}.{name}"
        try:
            values[section][name] = _coerce(raw, _field_type(cls, name), name, from_text)
        except ValueError as exc:
            problems.append(f"{dotted}: {exc} (from {origin})")
            bad_paths.add(dotted)
            values[section].pop(name, None)
            sources.pop(dotted, None)
        else:
            sources[dotted] = origin

    for name, close in unknown_env(env):
        log.warning(
            "config.unknown_variable name=%s did_you_mean=%s",
            name,
            close or "-",
        )

    path = path if path is not None else (env.get("WEIGHTCACHE_CONFIG") or None)
    if path is not None:
        where = os.fspath(path)
        doc: dict[str, Any] = {}
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            problems.append(f"config file {where}: {exc.strerror}")
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"config file {where}: {exc}")
        for section, table in doc.items():
            if section not in _SECTIONS:
                near = difflib.get_close_matches(section, list(_SECTIONS), n=1)
                problems.append(
                    f"{section}: unknown section (in {where}; known: {', '.join(_SECTIONS)})"
                    + (f"; did you mean [{near[0]}]?" if near else "")
                )
                continue
            if not isinstance(table, dict):
                problems.append(f"{section}: must be a table (in {where})")
                continue
            known = [f.name for f in dataclasses.fields(_SECTIONS[section])]
            for name, raw in table.items():
                if name not in known:
                    near = difflib.get_close_matches(name, known, n=1)
                    problems.append(
                        f"{section}.{name}: unknown option (in {where})"
                        + (f"; did you mean {section}.{near[0]}?" if near else "")
                    )
                elif (section, name) in _SECRET_FIELDS:
                    hint = (
                        "WEIGHTCACHE_TOKEN or daemon.token_file"
                        if section == "daemon"
                        else "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, "
                        "the shared credentials file (s3.profile), web identity or the "
                        "instance role"
                    )
                    problems.append(
                        f"{section}.{name}: secrets are read from {hint} only, "
                        f"never from the config file (in {where})"
                    )
                else:
                    put(section, name, raw, where, from_text=False)

    for var, (section, name) in _AWS_ENV.items():
        if env.get(var):
            put(section, name, env[var], var, from_text=True)
    for var, (section, name) in _ALIASES.items():
        if env.get(var):
            put(section, name, env[var], var, from_text=True)
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            var = f"WEIGHTCACHE_{section}_{f.name}".upper()
            if var in env:
                put(section, f.name, env[var], var, from_text=True)

    for dotted, raw in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if section not in _SECTIONS or name not in {
            f.name for f in dataclasses.fields(_SECTIONS[section])
        }:
            problems.append(f"{dotted}: unknown option (from the command line)")
            continue
        put(section, name, raw, "command line", from_text=isinstance(raw, str))

    values["cache"].setdefault("dir", _default_cache_dir(env))
    values["s3"].setdefault("shared_credentials_file", _aws_file("credentials", env))
    values["s3"].setdefault("config_file", _aws_file("config", env))
    token_file = values["daemon"].get("token_file")
    if token_file and not values["daemon"].get("token"):
        try:
            values["daemon"]["token"] = Path(token_file).read_text().strip()
        except OSError as exc:
            problems.append(
                f"daemon.token_file: {exc.strerror}: {token_file} "
                f"(from {sources.get('daemon.token_file', 'default')})"
            )
    cfg = Config(**{s: _SECTIONS[s](**values[s]) for s in _SECTIONS})
    for dotted, text in _check(cfg):
        if dotted not in bad_paths:
            problems.append(f"{text} (from {sources.get(dotted, 'the default')})")
    if problems:
        raise ConfigInvalid(problems)
    return cfg
