"""Credentials from each place AWS users keep them, against the real SeaweedFS.

Static keys, a shared credentials file chosen by ``AWS_PROFILE``, and static keys
with a session token. The metadata service is switched off in every test so that
a wrong key never sends the chain towards 169.254.169.254.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from weightcache.config import load_config
from weightcache.errors import OriginDenied
from weightcache.origin.s3 import S3Origin, credential_chain

KEY = "org/m/blob"
BODY = b"weights" * 100


@pytest.fixture
def stored(s3: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    s3.minio.put_object(s3.bucket, KEY, io.BytesIO(BODY), len(BODY))
    monkeypatch.setenv("HOME", str(tmp_path))  # no developer ~/.aws
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    return s3


def read_with_env(bucket: str) -> bytes:
    origin = S3Origin(bucket, load_config().s3)
    try:
        return origin.read(KEY, max_bytes=1 << 20)
    finally:
        origin.close()


def test_static_keys_from_the_environment(stored: Any) -> None:
    assert read_with_env(stored.bucket) == BODY


def test_wrong_static_keys_are_denied_naming_the_endpoint(
    stored: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(OriginDenied) as info:
        read_with_env(stored.bucket)
    assert stored.env["AWS_ENDPOINT_URL"] in info.value.message
    assert "not-the-secret" not in str(info.value)


def _profiles(tmp_path: Path, access: str, secret: str) -> Path:
    path = tmp_path / "shared-credentials"
    path.write_text(
        "[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong-secret\n"
        f"[weights]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n"
    )
    return path


def test_shared_credentials_file_with_a_profile(
    stored: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _profiles(tmp_path, stored.env["AWS_ACCESS_KEY_ID"], stored.env["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    monkeypatch.setenv("AWS_PROFILE", "weights")
    assert read_with_env(stored.bucket) == BODY

    # Without the profile the default one, with the wrong keys, is used: and denied.
    monkeypatch.delenv("AWS_PROFILE")
    with pytest.raises(OriginDenied):
        read_with_env(stored.bucket)


def test_environment_keys_win_over_the_file(
    stored: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _profiles(tmp_path, "wrong", "wrong-secret")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    monkeypatch.setenv("AWS_PROFILE", "weights")
    assert read_with_env(stored.bucket) == BODY


def test_session_token_with_static_keys_reaches_seaweedfs(
    stored: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SeaweedFS takes a request carrying X-Amz-Security-Token for STS-issued
    # credentials and looks the key up there, so static keys with a token are
    # refused; the same keys without one are accepted (test above). The refusal is
    # the token arriving; tests/unit/test_credentials.py checks the header itself.
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-session-token")
    assert credential_chain(load_config().s3).retrieve().session_token == "a-session-token"
    with pytest.raises(OriginDenied, match="InvalidAccessKeyId"):
        read_with_env(stored.bucket)
