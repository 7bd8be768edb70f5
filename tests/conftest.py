"""Fixtures shared by every test: an isolated cache directory, and a real local S3 server."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import hypothesis  # noqa: F401
import pytest
import urllib3
from minio import Minio

from weightcache.demo.seaweed import SeaweedServer

# hypothesis is imported up front (above): its pytest plugin otherwise imports it
# in the terminal summary, where a finaliser run by the garbage collector during
# assertion rewriting trips CPython 3.11's "AST constructor recursion depth
# mismatch" SystemError. A collection before the summary keeps finalisers out.


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The default run is the whole suite, slow scenarios included: they go last, so
    # that a quick test's failure shows in minutes. sorted() is stable, so each
    # group keeps pytest's own order.
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("slow") is not None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import gc

    gc.collect()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> object:
    # The same SystemError can strike while pytest renders a failure: collect the
    # failed test's garbage (and its finalisers) before the report is built.
    try:
        return (yield)
    finally:
        import gc

        gc.collect()


# Credentials and endpoints a developer may have exported: a test must never reach them.
_AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
)


@dataclass(frozen=True)
class S3Env:
    """One test's view of the session's S3 server: its own bucket, and a client for it."""

    server: SeaweedServer
    bucket: str
    env: dict[str, str]
    minio: Minio

    def sent_bytes(self) -> int:
        """Bytes the server has sent from this test's bucket so far."""
        return self.server.sent_bytes(self.bucket)


@pytest.fixture(autouse=True)
def _isolated_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A fresh cache per test, outside tmp_path so tests can list tmp_path freely;
    # no other WEIGHTCACHE_* setting (socket, URL, config file, tuning) leaks in.
    for name in list(os.environ):
        if name.startswith("WEIGHTCACHE_") or name in _AWS_VARS:
            monkeypatch.delenv(name)
    monkeypatch.setenv("WEIGHTCACHE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    # Tests send traffic to loopback only: no test (nor a daemon it starts) may ask the
    # instance metadata service at 169.254.169.254 for credentials. A config built from
    # an explicit env that names no metadata endpoint gets a closed loopback port.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr("weightcache.origin.s3.METADATA_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def s3(
    s3_server: SeaweedServer, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[S3Env]:
    # A bucket per test keeps the server's per-bucket byte counters per test; the
    # test's name in it says whose bucket it is when reading the server's log.
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    bucket = f"{stem or 't'}-{secrets.token_hex(4)}"
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5.0, read=60.0))
    try:
        client = s3_server.client(http)
        client.make_bucket(bucket)
        env = s3_server.env()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield S3Env(server=s3_server, bucket=bucket, env=env, minio=client)
    finally:
        # Pooled keep-alive sockets would otherwise surface as ResourceWarnings (errors here).
        http.clear()
