"""The S3 credential chain, endpoint and CA settings, and how S3 failures read.

The metadata service here is a real HTTP server on loopback speaking the IMDSv2
routes minio asks for; nothing leaves 127.0.0.1. Every test points the chain's
files into its own directory, so a developer's ~/.aws never takes part.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from weightcache.config import load_config
from weightcache.errors import (
    ConfigInvalid,
    ObjectNotFound,
    OriginDenied,
    OriginHostUnknown,
    OriginUnavailable,
)
from weightcache.origin.s3 import S3Origin, credential_chain

# minio's IamAwsProvider reads these from the process environment itself.
_PROCESS_VARS = (
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_PROFILE",
    "AWS_REGION",
)


@pytest.fixture(autouse=True)
def _no_process_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _PROCESS_VARS:
        monkeypatch.delenv(name, raising=False)


class FakeIMDS:
    """IMDSv2 on loopback: a token, one role, and its credentials with an expiry."""

    def __init__(self, lifetime: timedelta) -> None:
        self.lifetime = lifetime
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                assert self.path == "/latest/api/token"
                self._send(b"imds-token")

            def do_GET(self) -> None:
                assert self.headers["X-aws-ec2-metadata-token"] == "imds-token"
                base = "/latest/meta-data/iam/security-credentials/"
                if self.path == base:
                    self._send(b"node-role")
                    return
                assert self.path == base + "node-role"
                outer.fetches += 1
                expires = datetime.now(UTC) + outer.lifetime
                self._send(
                    json.dumps(
                        {
                            "Code": "Success",
                            "AccessKeyId": f"imds-key-{outer.fetches}",
                            "SecretAccessKey": "imds-secret",
                            "Token": "imds-session",
                            "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        }
                    ).encode()
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def imds() -> Iterator[FakeIMDS]:
    server = FakeIMDS(timedelta(hours=6))
    try:
        yield server
    finally:
        server.close()


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path), **extra}


def _write_credentials(tmp_path: Path) -> Path:
    path = tmp_path / ".aws" / "credentials"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        "[default]\naws_access_key_id = file-default\naws_secret_access_key = s\n"
        "[team]\naws_access_key_id = file-team\naws_secret_access_key = s\n"
        "aws_session_token = file-session\n"
    )
    return path


def test_chain_order_env_then_file_then_metadata(tmp_path: Path, imds: FakeIMDS) -> None:
    _write_credentials(tmp_path)
    base = _env(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url)
    keys = {"AWS_ACCESS_KEY_ID": "env-key", "AWS_SECRET_ACCESS_KEY": "s"}

    creds = credential_chain(load_config(env={**base, **keys}).s3).retrieve()
    assert creds.access_key == "env-key"
    assert creds.session_token is None

    creds = credential_chain(load_config(env={**base, "AWS_PROFILE": "team"}).s3).retrieve()
    assert (creds.access_key, creds.session_token) == ("file-team", "file-session")
    assert credential_chain(load_config(env=base).s3).retrieve().access_key == "file-default"
    assert imds.fetches == 0

    (tmp_path / ".aws" / "credentials").unlink()
    creds = credential_chain(load_config(env=base).s3).retrieve()
    assert (creds.access_key, creds.session_token) == ("imds-key-1", "imds-session")


def test_session_token_comes_with_env_keys(tmp_path: Path) -> None:
    env = _env(
        tmp_path,
        AWS_ACCESS_KEY_ID="k",
        AWS_SECRET_ACCESS_KEY="s",
        AWS_SESSION_TOKEN="sEsSiOnT0K",
        AWS_EC2_METADATA_DISABLED="true",
    )
    cfg = load_config(env=env)
    assert "sEsSiOnT0K" not in repr(cfg)
    assert credential_chain(cfg.s3).retrieve().session_token == "sEsSiOnT0K"


def test_profile_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "aws-config"
    config.write_text(
        "[default]\nregion = eu-west-1\n"
        "[profile ops]\naws_access_key_id = cfg-ops\naws_secret_access_key = s\n"
    )
    env = _env(
        tmp_path, AWS_CONFIG_FILE=str(config), AWS_PROFILE="ops", AWS_EC2_METADATA_DISABLED="1"
    )
    assert credential_chain(load_config(env=env).s3).retrieve().access_key == "cfg-ops"


def test_metadata_credentials_are_renewed_before_they_expire(tmp_path: Path) -> None:
    # minio treats credentials as expired 10 s early: these are stale on arrival.
    server = FakeIMDS(timedelta(seconds=5))
    try:
        chain = credential_chain(
            load_config(env=_env(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=server.url)).s3
        )
        assert chain.retrieve().access_key == "imds-key-1"
        assert chain.retrieve().access_key == "imds-key-2"
        server.lifetime = timedelta(hours=1)
        assert chain.retrieve().access_key == "imds-key-3"
        assert chain.retrieve().access_key == "imds-key-3"  # still fresh: no new fetch
        assert server.fetches == 3
    finally:
        server.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_nothing_configured_ends_at_metadata_and_says_what_was_tried(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    chain = credential_chain(
        load_config(env=_env(tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint)).s3
    )
    started = time.monotonic()
    with pytest.raises(OriginDenied) as info:
        chain.retrieve()
    assert time.monotonic() - started < 2.0
    text = str(info.value)
    for part in ("environment", "profile default in", "credentials", endpoint, "AWS_PROFILE"):
        assert part in text


def test_a_silent_metadata_service_is_bounded(tmp_path: Path) -> None:
    # A listener that never answers: the connect succeeds, the read must time out.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = _env(
            tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint, AWS_METADATA_SERVICE_TIMEOUT="0.2"
        )
        chain = credential_chain(load_config(env=env).s3)
        started = time.monotonic()
        with pytest.raises(OriginDenied, match="ReadTimeoutError"):
            chain.retrieve()
        assert time.monotonic() - started < 1.5


def test_metadata_can_be_switched_off(tmp_path: Path) -> None:
    chain = credential_chain(load_config(env=_env(tmp_path, AWS_EC2_METADATA_DISABLED="true")).s3)
    with pytest.raises(OriginDenied) as info:
        chain.retrieve()
    assert "instance metadata" not in info.value.message


class FakeSTS:
    """AssumeRoleWithWebIdentity on loopback: records each call's token and role."""

    def __init__(self, lifetime: timedelta) -> None:
        self.lifetime = lifetime
        self.calls: list[dict[str, list[str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                outer.calls.append(query)
                expires = (datetime.now(UTC) + outer.lifetime).strftime("%Y-%m-%dT%H:%M:%SZ")
                body = (
                    '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/'
                    '2011-06-15/"><AssumeRoleWithWebIdentityResult><Credentials>'
                    f"<AccessKeyId>sts-key-{len(outer.calls)}</AccessKeyId>"
                    "<SecretAccessKey>sts-secret</SecretAccessKey>"
                    "<SessionToken>sts-session</SessionToken>"
                    f"<Expiration>{expires}</Expiration>"
                    "</Credentials></AssumeRoleWithWebIdentityResult>"
                    "</AssumeRoleWithWebIdentityResponse>"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_web_identity_irsa_and_its_renewal(
    tmp_path: Path, imds: FakeIMDS, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What EKS puts in a pod with IRSA; minio's provider also reads these two.
    token = tmp_path / "token"
    token.write_text("jwt-1")
    role = "arn:aws:iam::123456789012:role/weightcache"
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ROLE_ARN", role)
    sts = FakeSTS(timedelta(seconds=5))  # stale on arrival: every retrieve renews
    try:
        env = _env(
            tmp_path,
            AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
            AWS_ROLE_ARN=role,
            AWS_ENDPOINT_URL_STS=sts.url,
            AWS_EC2_METADATA_SERVICE_ENDPOINT=imds.url,
        )
        chain = credential_chain(load_config(env=env).s3)
        creds = chain.retrieve()
        assert (creds.access_key, creds.session_token) == ("sts-key-1", "sts-session")
        token.write_text("jwt-2")  # kubelet rotated the projected token
        assert chain.retrieve().access_key == "sts-key-2"
    finally:
        sts.close()
    assert [c["WebIdentityToken"] for c in sts.calls] == [["jwt-1"], ["jwt-2"]]
    assert sts.calls[0]["RoleArn"] == [role]
    assert sts.calls[0]["Action"] == ["AssumeRoleWithWebIdentity"]
    assert imds.fetches == 0
    names = [link.name.split(" ")[0] for link in chain.links]
    assert names == ["environment", "profile", "profile", "web"]


def test_a_refused_web_identity_does_not_leak_the_token(tmp_path: Path) -> None:
    class Refuse(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = tmp_path / "token"
    token.write_text("eyJ-secret-jwt")
    env = _env(
        tmp_path,
        AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
        AWS_ROLE_ARN="arn:aws:iam::123456789012:role/wc",
        AWS_ENDPOINT_URL_STS=f"http://127.0.0.1:{server.server_address[1]}",
    )
    try:
        with pytest.raises(OriginDenied) as info:
            credential_chain(load_config(env=env).s3).retrieve()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert "web identity" in str(info.value) and "403" in str(info.value)
    assert "eyJ-secret-jwt" not in str(info.value)
    # Nor does a logged traceback: the causes quoting the URL are suppressed.
    printed = "".join(traceback.format_exception(info.value))
    assert "eyJ-secret-jwt" not in printed


def test_debug_logging_never_shows_the_web_identity_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # urllib3 logs each request line at DEBUG, and minio puts the token in the
    # query of the STS URL.
    token = tmp_path / "token"
    token.write_text("eyJ-irsa-jwt-in-the-query")
    role = "arn:aws:iam::123456789012:role/weightcache"
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ROLE_ARN", role)
    sts = FakeSTS(timedelta(hours=1))
    try:
        env = _env(
            tmp_path,
            AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
            AWS_ROLE_ARN=role,
            AWS_ENDPOINT_URL_STS=sts.url,
        )
        with caplog.at_level(logging.DEBUG):
            creds = credential_chain(load_config(env=env).s3).retrieve()
            # When a connection breaks, urllib3 logs the URL it retries at WARNING
            # (a POST is retried only when the connect fails): its call, as made.
            url = f"/?Action=AssumeRoleWithWebIdentity&WebIdentityToken={token.read_text()}"
            logging.getLogger("urllib3.connectionpool").warning(
                "Retrying (%r) after connection broken by '%r': %s",
                "Retry(total=1)",
                ConnectionRefusedError(111, "refused"),
                url,
            )
            logging.getLogger("urllib3.util.retry").debug(
                "Incremented Retry for (url='%s'): %r", url, "Retry(total=1)"
            )
    finally:
        sts.close()
    assert creds.access_key == "sts-key-1"
    assert [c["WebIdentityToken"] for c in sts.calls] == [["eyJ-irsa-jwt-in-the-query"]]
    urllib3_lines = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3.")]
    # The records are there, query and all, with the token cut out of each.
    requested = [m for m in urllib3_lines if '"POST /?' in m]
    assert len(requested) == 1 and "RoleArn=arn" in requested[0], urllib3_lines
    redacted = [m for m in urllib3_lines if "WebIdentityToken=REDACTED" in m]
    assert len(redacted) == 3, urllib3_lines
    for secret in ("eyJ-irsa-jwt-in-the-query", "sts-secret", "sts-session"):
        assert secret not in caplog.text
        assert not [m for m in urllib3_lines if secret in m]


def test_endpoint_and_region_precedence(tmp_path: Path) -> None:
    env = _env(
        tmp_path,
        AWS_ENDPOINT_URL="http://general:9000",
        AWS_ENDPOINT_URL_S3="http://s3-only:9000",
        AWS_DEFAULT_REGION="eu-west-1",
        AWS_REGION="eu-central-1",
    )
    s3 = load_config(env=env).s3
    assert (s3.endpoint_url, s3.region) == ("http://s3-only:9000", "eu-central-1")
    s3 = load_config(env=_env(tmp_path, AWS_DEFAULT_REGION="eu-west-1")).s3
    assert s3.region == "eu-west-1"
    s3 = load_config(env={**env, "WEIGHTCACHE_S3_ENDPOINT_URL": "http://mine:1"}).s3
    assert s3.endpoint_url == "http://mine:1"


def test_ca_bundle_reaches_the_connection_pool(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    cfg = load_config(env=_env(tmp_path, AWS_CA_BUNDLE=str(bundle)))
    origin = S3Origin("models", cfg.s3)
    try:
        assert origin._http.connection_pool_kw["ca_certs"] == str(bundle)
    finally:
        origin.close()


def test_session_token_is_not_accepted_from_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "wc.toml"
    toml.write_text('[s3]\nsession_token = "leak"\nprofile = "team"\n')
    with pytest.raises(ConfigInvalid, match=r"s3\.session_token: secrets are read from") as info:
        load_config(toml, env=_env(tmp_path))
    assert "leak" not in str(info.value)


@contextmanager
def _recording_origin() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A loopback server that records the headers of what it is sent (and answers 404)."""
    seen: list[dict[str, str]] = []

    class Recorder(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return None  # quiet

        def do_GET(self) -> None:
            seen.append(dict(self.headers))
            body = b"<Error><Code>NoSuchKey</Code><Message>no</Message></Error>"
            self.send_response(404)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_session_token_reaches_the_signer(tmp_path: Path) -> None:
    with _recording_origin() as (endpoint, seen):
        env = _env(
            tmp_path,
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="AKIDEXAMPLE",
            AWS_SECRET_ACCESS_KEY="s",
            AWS_SESSION_TOKEN="sEsSiOnT0K",
        )
        origin = S3Origin("models", load_config(env=env).s3)
        try:
            with pytest.raises(ObjectNotFound):
                origin.read("m/manifest.json", max_bytes=1024)
        finally:
            origin.close()
    assert seen[0]["X-Amz-Security-Token"] == "sEsSiOnT0K"
    assert "Credential=AKIDEXAMPLE/" in seen[0]["Authorization"]
    assert "x-amz-security-token" in seen[0]["Authorization"]  # signed, not just sent


# -- failures name the endpoint ------------------------------------------------------


def test_an_unresolvable_endpoint_fails_at_once(tmp_path: Path) -> None:
    # RFC 2606: .invalid never resolves, and the resolver says so without a query.
    endpoint = "http://weightcache-origin.invalid:8333"
    env = _env(
        tmp_path, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s"
    )
    origin = S3Origin("models", load_config(env=env).s3)
    started = time.monotonic()
    try:
        with pytest.raises(OriginHostUnknown) as info:
            origin.read("m/manifest.json", max_bytes=1024)
    finally:
        origin.close()
    assert time.monotonic() - started < 0.5
    assert endpoint in str(info.value)
    assert "1 attempt" in str(info.value)
    assert not info.value.retryable
    assert info.value.hint and "AWS_ENDPOINT_URL" in info.value.hint


def test_the_aws_default_endpoint_is_named_as_such(tmp_path: Path) -> None:
    from weightcache.origin.s3 import describe_endpoint

    text = describe_endpoint(load_config(env=_env(tmp_path)).s3)
    assert "the AWS default" in text and "https://s3.amazonaws.com" in text


def test_a_refused_connection_names_the_endpoint(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = _env(
        tmp_path, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s"
    )
    origin = S3Origin("models", load_config(env=env).s3)
    try:
        with pytest.raises(OriginUnavailable) as info:
            origin.read("m/manifest.json", max_bytes=1024)
    finally:
        origin.close()
    assert endpoint in info.value.message
    assert "refused" in info.value.message.lower()
    assert info.value.hint


def test_anonymous_requests_are_unsigned_and_need_no_credentials(tmp_path: Path) -> None:
    # A public bucket: nothing configured anywhere. Without s3.anonymous that is
    # origin_denied before any request; with it, requests go out unsigned.
    with _recording_origin() as (endpoint, seen):
        env = _env(tmp_path, AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true")
        origin = S3Origin("models", load_config(env=env).s3)
        try:
            with pytest.raises(OriginDenied, match="no S3 credentials found"):
                origin.read("m/manifest.json", max_bytes=1024)
        finally:
            origin.close()
        assert seen == []
        anonymous = load_config(env={**env, "WEIGHTCACHE_S3_ANONYMOUS": "true"}).s3
        origin = S3Origin("models", anonymous)
        try:
            with pytest.raises(ObjectNotFound):
                origin.read("m/manifest.json", max_bytes=1024)
        finally:
            origin.close()
        assert len(seen) == 1 and "Authorization" not in seen[0]
