"""The S3 fixture itself: real SeaweedFS, per-test buckets, exact byte accounting."""

from __future__ import annotations

import io
import os
import random
from typing import TYPE_CHECKING

import pytest
import urllib3
from minio import Minio
from minio.error import S3Error

from weightcache.demo.seaweed import parse_sent_bytes

if TYPE_CHECKING:
    # Annotations only: conftest is pytest's to import, not a module of the package.
    from conftest import S3Env


def put_random(s3: S3Env, key: str, size: int) -> bytes:
    body = random.Random(size).randbytes(size)
    s3.minio.put_object(s3.bucket, key, io.BytesIO(body), size)
    return body


def get_range(client: Minio, bucket: str, key: str, offset: int, length: int) -> bytes:
    resp = client.get_object(bucket, key, offset=offset, length=length)
    try:
        return resp.read()
    finally:
        resp.close()
        resp.release_conn()


def test_ranged_get_counts_exactly_the_bytes_read(s3: S3Env) -> None:
    # Larger than the filer's 4 MiB chunks, so the range spans two of them.
    body = put_random(s3, "blob.bin", 6 << 20)
    assert s3.sent_bytes() == 0  # uploads are received bytes, not sent ones
    offset, length = 3_000_000, 2_500_000

    data = get_range(s3.minio, s3.bucket, "blob.bin", offset, length)

    assert data == body[offset : offset + length]
    assert s3.sent_bytes() == length
    assert s3.server.sent_bytes() >= length  # the sum over buckets includes ours


def test_another_bucket_does_not_see_this_buckets_traffic(s3: S3Env) -> None:
    other = f"{s3.bucket}-other"
    s3.server.make_bucket(other)
    put_random(s3, "x", 1000)

    get_range(s3.minio, s3.bucket, "x", 0, 1000)

    assert s3.sent_bytes() == 1000
    assert s3.server.sent_bytes(other) == 0
    assert s3.server.sent_bytes("no-such-bucket") == 0


def test_each_test_starts_with_an_empty_bucket_and_counter(s3: S3Env) -> None:
    assert list(s3.minio.list_objects(s3.bucket, recursive=True)) == []
    assert s3.sent_bytes() == 0


def test_environment_points_at_the_server_and_auth_is_enforced(s3: S3Env) -> None:
    expected = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"}
    assert set(s3.env) == expected
    assert all(os.environ[name] == value for name, value in s3.env.items())
    assert s3.env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")

    http = urllib3.PoolManager(retries=False)
    try:
        anonymous = http.request("GET", f"{s3.server.endpoint}/{s3.bucket}")
        assert anonymous.status == 403
        wrong = Minio(
            s3.env["AWS_ENDPOINT_URL"].removeprefix("http://"),
            access_key=s3.env["AWS_ACCESS_KEY_ID"],
            secret_key="not-the-secret",
            secure=False,
            region=s3.env["AWS_REGION"],
            http_client=http,
        )
        with pytest.raises(S3Error) as err:
            wrong.list_objects(s3.bucket).__next__()
        assert err.value.code == "SignatureDoesNotMatch"
    finally:
        http.clear()


def test_isolated_cache_dir_and_no_stray_settings(tmp_path_factory: pytest.TempPathFactory) -> None:
    cache = os.environ["WEIGHTCACHE_CACHE_DIR"]
    assert cache.startswith(str(tmp_path_factory.getbasetemp()))
    assert not {"WEIGHTCACHE_SOCKET", "WEIGHTCACHE_URL", "WEIGHTCACHE_CONFIG"} & set(os.environ)


def test_parse_sent_bytes_reads_go_float_counters() -> None:
    text = (
        "# TYPE SeaweedFS_s3_bucket_traffic_sent_bytes_total counter\n"
        'SeaweedFS_s3_bucket_traffic_sent_bytes_total{bucket="models"} 2.097152e+07\n'
        'SeaweedFS_s3_bucket_traffic_sent_bytes_total{bucket="other"} 1000\n'
        'SeaweedFS_s3_bucket_traffic_received_bytes_total{bucket="models"} 5\n'
    )
    assert parse_sent_bytes(text, "models") == 20_971_520
    assert parse_sent_bytes(text, "missing") == 0
    assert parse_sent_bytes(text) == 20_972_520
