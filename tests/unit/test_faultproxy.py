"""The fault proxy itself, against the real SeaweedFS: verbatim forwarding, then each fault.

Raw ``http.client`` requests show what a fault does on the wire (status, bytes
delivered before a cut, which byte changed); minio requests show that SigV4
survives the proxy (the Host header, the path, the query and the body are
forwarded as signed).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3
from minio import Minio
from minio.error import S3Error

from tests.support.faultproxy import FaultProxy, Rule

KEY = "obj/data.bin"
SIZE = 300_000


@pytest.fixture
def proxy(s3: Any) -> Iterator[FaultProxy]:
    with FaultProxy(s3.env["AWS_ENDPOINT_URL"]) as p:
        yield p


@pytest.fixture
def data(s3: Any) -> bytes:
    body = os.urandom(SIZE)
    s3.minio.put_object(s3.bucket, KEY, io.BytesIO(body), len(body))
    return body


@pytest.fixture
def via_proxy(s3: Any, proxy: FaultProxy) -> Iterator[Minio]:
    """A minio client that signs for, and talks to, the proxy."""
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5.0, read=10.0), retries=False)
    try:
        yield Minio(
            proxy.url.removeprefix("http://"),
            access_key=s3.env["AWS_ACCESS_KEY_ID"],
            secret_key=s3.env["AWS_SECRET_ACCESS_KEY"],
            region=s3.env["AWS_REGION"],
            secure=False,
            http_client=http,
        )
    finally:
        http.clear()


def signed_get(client: Minio, bucket: str, key: str, offset: int = 0, length: int = 0) -> bytes:
    resp = client.get_object(bucket, key, offset=offset, length=length)
    try:
        return bytes(resp.read(decode_content=False))
    finally:
        resp.close()
        resp.release_conn()


def raw_get(
    proxy: FaultProxy, path: str, *, timeout: float = 10.0, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes, BaseException | None]:
    """An unsigned GET through the proxy, reading the body until it ends or breaks.

    Unsigned is enough to watch the faults on the wire: the rules fire before the
    origin is asked, and a forwarded unsigned request gets the origin's 403.
    """
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    body = bytearray()
    error: BaseException | None = None
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        status, head = resp.status, {k.lower(): v for k, v in resp.getheaders()}
        try:
            while piece := resp.read1(65536):
                body += piece
            if resp.length:  # http.client stops at EOF without complaint: say so
                raise http.client.IncompleteRead(bytes(body), resp.length)
        except (OSError, http.client.HTTPException) as exc:
            error = exc
        return status, head, bytes(body), error
    finally:
        conn.close()


def test_forwards_signed_requests_verbatim(
    s3: Any, proxy: FaultProxy, data: bytes, via_proxy: Minio
) -> None:
    # GET, a ranged GET, HEAD, a listing (a signed query string) and a PUT (a signed
    # body) all pass: SigV4 would fail on any change to the host, path, query or body.
    assert signed_get(via_proxy, s3.bucket, KEY) == data
    assert signed_get(via_proxy, s3.bucket, KEY, 1000, 5000) == data[1000:6000]
    assert via_proxy.stat_object(s3.bucket, KEY).size == SIZE
    assert [o.object_name for o in via_proxy.list_objects(s3.bucket, prefix="obj/")] == [KEY]
    fresh = os.urandom(70_000)
    via_proxy.put_object(s3.bucket, "obj/put.bin", io.BytesIO(fresh), len(fresh))
    assert signed_get(s3.minio, s3.bucket, "obj/put.bin") == fresh

    proxy.wait_idle()
    methods = [(r.method, r.status, r.fault, r.outcome) for r in proxy.log]
    assert methods == [
        ("GET", 200, None, "ok"),
        ("GET", 206, None, "ok"),
        ("HEAD", 200, None, "ok"),
        ("GET", 200, None, "ok"),
        ("PUT", 200, None, "ok"),
    ]
    get, ranged, head = proxy.log[:3]
    assert get.path == f"/{s3.bucket}/{KEY}" and get.bytes_sent == SIZE and get.range is None
    assert ranged.range == "bytes=1000-5999" and ranged.range_start == 1000
    assert ranged.bytes_sent == 5000 and head.bytes_sent == 0
    assert "list-type=2" in proxy.log[3].query
    assert all(r.end is not None and r.end >= r.time for r in proxy.log)


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("503", 503, "SlowDown"),
        ("429", 429, "TooManyRequests"),
        ("500", 500, "InternalError"),
        ("403", 403, "AccessDenied"),
    ],
)
def test_status_faults_answer_s3_errors_without_asking_the_origin(
    s3: Any, proxy: FaultProxy, data: bytes, via_proxy: Minio, fault: str, status: int, code: str
) -> None:
    proxy.add_rule("data.bin", fault, times=1)
    before = s3.sent_bytes()
    with pytest.raises(S3Error) as info:
        signed_get(via_proxy, s3.bucket, KEY)
    assert info.value.code == code and info.value.response.status == status
    assert s3.sent_bytes() == before  # the origin never saw it
    assert signed_get(via_proxy, s3.bucket, KEY) == data  # times=1: the next one passes
    proxy.wait_idle()
    first, second = proxy.log
    assert (first.fault, first.status, second.fault, second.status) == (fault, status, None, 200)


def test_reset_delivers_exactly_the_bytes_before_the_cut(
    proxy: FaultProxy, s3: Any, data: bytes
) -> None:
    # The head promises the whole object, then a RST after the cut.
    proxy.add_rule(KEY, "reset", after_bytes=100_000)
    proxy.add_rule(KEY, "reset")  # never reached: the first matching rule wins
    status, head, body, error = signed_raw_get(proxy, s3)
    assert status == 200 and int(head["content-length"]) == SIZE
    assert body == data[:100_000]
    assert isinstance(error, ConnectionResetError)
    rec = proxy.log[-1]
    assert (rec.fault, rec.status, rec.bytes_sent, rec.outcome) == (
        "reset@100000",
        200,
        100_000,
        "reset",
    )

    # Before any response: the connection dies with no status line at all.
    proxy.clear()
    proxy.add_rule(KEY, "reset", times=1)
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        signed_raw_get(proxy, s3)
    assert (proxy.log[-1].fault, proxy.log[-1].status) == ("reset@headers", None)


def signed_raw_get(
    proxy: FaultProxy, s3: Any, *, range_header: str | None = None
) -> tuple[int, dict[str, str], bytes, BaseException | None]:
    """A GET with SigV4 headers minted by minio for the proxy's host, sent by http.client."""
    signer = Minio(
        proxy.url.removeprefix("http://"),
        access_key=s3.env["AWS_ACCESS_KEY_ID"],
        secret_key=s3.env["AWS_SECRET_ACCESS_KEY"],
        region=s3.env["AWS_REGION"],
        secure=False,
    )
    url = signer.presigned_get_object(s3.bucket, KEY)
    path = url[url.index("/", len("http://")) :]
    headers = {"Range": range_header} if range_header else {}
    return raw_get(proxy, path, headers=headers)


def test_truncate_sends_the_full_length_then_ends_the_body(
    proxy: FaultProxy, s3: Any, data: bytes
) -> None:
    proxy.add_rule(KEY, "truncate", after_bytes=123_457, times=1)
    status, head, body, error = signed_raw_get(proxy, s3)
    assert status == 200 and int(head["content-length"]) == SIZE
    assert body == data[:123_457]
    assert isinstance(error, http.client.IncompleteRead)
    rec = proxy.log[-1]
    assert (rec.fault, rec.bytes_sent, rec.outcome) == ("truncate@123457", 123_457, "truncated")
    # times=1: the next request is whole.
    assert signed_raw_get(proxy, s3)[2] == data


def test_flip_changes_exactly_one_byte_at_the_offset(
    proxy: FaultProxy, s3: Any, data: bytes
) -> None:
    proxy.add_rule(re.compile(r"/obj/data\.bin$"), "flip", offset=77_777)
    status, _, body, error = signed_raw_get(proxy, s3, range_header="bytes=1000-199999")
    assert status == 206 and error is None and len(body) == 199_000
    diff = [i for i in range(len(body)) if body[i] != data[1000 + i]]
    assert diff == [77_777] and body[77_777] == data[1000 + 77_777] ^ 0xFF
    proxy.wait_idle()
    rec = proxy.log[-1]
    assert (rec.fault, rec.range_start, rec.bytes_sent) == ("flip@77777", 1000, 199_000)


def test_stall_holds_the_response_before_or_mid_body(
    proxy: FaultProxy, s3: Any, data: bytes
) -> None:
    proxy.add_rule(KEY, "stall", seconds=0.3, times=1)
    t0 = time.monotonic()
    assert signed_raw_get(proxy, s3)[2] == data
    assert time.monotonic() - t0 >= 0.3

    proxy.add_rule(KEY, "stall", seconds=0.3, after_bytes=1000, times=1)
    t0 = time.monotonic()
    status, _, body, error = signed_raw_get(proxy, s3)
    assert (status, body, error) == (200, data, None)
    assert time.monotonic() - t0 >= 0.3
    assert [r.fault for r in proxy.log] == ["stall", "stall@1000"]

    # A client that gives up: the proxy notices and records it.
    proxy.add_rule(KEY, "stall", seconds=30, times=1)
    with pytest.raises(TimeoutError):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=0.2)
        try:
            conn.request("GET", f"/{s3.bucket}/{KEY}")
            conn.getresponse()
        finally:
            conn.close()
    proxy.wait_idle(timeout_s=5)
    assert proxy.log[-1].outcome == "client_gone" and proxy.log[-1].status is None


def test_throttle_limits_the_body_rate(proxy: FaultProxy, s3: Any, data: bytes) -> None:
    proxy.add_rule(KEY, "throttle", bytes_per_s=1_000_000)
    t0 = time.monotonic()
    assert signed_raw_get(proxy, s3)[2] == data
    elapsed = time.monotonic() - t0
    assert elapsed >= SIZE / 1_000_000 - 0.02
    proxy.wait_idle()
    rec = proxy.log[-1]
    assert rec.end is not None and rec.end - rec.time >= SIZE / 1_000_000 - 0.02


def test_schedules_times_every_and_request_numbers(proxy: FaultProxy, s3: Any) -> None:
    every = proxy.add_rule("/every", "503", every=3)
    first = proxy.add_rule("/first", "500", times=2)
    numbered = proxy.add_rule("/numbered", "429", requests={2, 4})
    for name in ("every", "first", "numbered"):
        for _ in range(6):
            raw_get(proxy, f"/{s3.bucket}/{name}")
    faults = [r.fault for r in proxy.log]
    assert faults[0:6] == [None, None, "503", None, None, "503"]
    assert faults[6:12] == ["500", "500", None, None, None, None]
    assert faults[12:18] == [None] * 6  # request numbers 13..18, not 2 and 4
    assert (every.matched, every.applied, first.applied, numbered.matched) == (6, 2, 2, 0)
    proxy.clear(log=True)
    proxy.add_rule(None, "429", requests={2, 4})
    for _ in range(5):
        raw_get(proxy, f"/{s3.bucket}/any")
    assert [r.fault for r in proxy.log] == [None, "429", None, "429", None]
    assert [r.status for r in proxy.log][1::2] == [429, 429]


def test_control_api_over_http(proxy: FaultProxy, s3: Any) -> None:
    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw and resp.status < 300 else raw
        finally:
            conn.close()

    status, made = call("POST", "/__proxy/rules", {"match": r"x\d$", "regex": True, "fault": "503"})
    assert status == 201 and made["label"] == "503"
    assert call("POST", "/__proxy/rules", {"fault": "explode"})[0] == 400
    assert raw_get(proxy, f"/{s3.bucket}/x1")[0] == 503
    assert raw_get(proxy, f"/{s3.bucket}/xy")[0] != 503
    status, records = call("GET", "/__proxy/log")
    assert [r["fault"] for r in records] == ["503", None]
    assert call("GET", "/__proxy/rules")[1] == [
        {"fault": "503", "label": "503", "matched": 1, "applied": 1}
    ]
    assert call("DELETE", "/__proxy/rules")[0] == 204
    assert raw_get(proxy, f"/{s3.bucket}/x1")[0] != 503


def test_rules_are_validated_and_only_loopback_is_allowed() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        Rule(fault="boom")
    with pytest.raises(ValueError, match="stall needs"):
        Rule(fault="stall")
    with pytest.raises(ValueError, match="throttle needs"):
        Rule(fault="throttle")
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        FaultProxy("http://example.com:9000")
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        FaultProxy("http://10.0.0.1:9000")


def test_stops_cleanly_with_requests_in_flight(s3: Any, data: bytes) -> None:
    proxy = FaultProxy(s3.env["AWS_ENDPOINT_URL"]).start()
    proxy.add_rule(KEY, "stall", seconds=30)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        sock.sendall(f"GET /{s3.bucket}/{KEY} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        deadline = time.monotonic() + 5
        while not proxy.log and time.monotonic() < deadline:
            time.sleep(0.005)
        t0 = time.monotonic()
        proxy.stop()
        assert time.monotonic() - t0 < 5
        assert sock.recv(1) == b""  # the proxy closed the connection
    finally:
        sock.close()
