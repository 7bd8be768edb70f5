"""Ref parsing: every malformed ref gets RefInvalid naming the problem."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightcache.errors import RefInvalid
from weightcache.refs import Ref, parse_ref

REV = "ab" * 32


def test_s3_ref() -> None:
    ref = parse_ref("s3://models/llama-3-8b")
    assert ref == Ref("s3", "models", "llama-3-8b", None)
    assert ref.location == "s3://models/llama-3-8b"


def test_s3_ref_nested_prefix_and_rev() -> None:
    ref = parse_ref(f"s3://models/org/llama/v1@{REV[:8]}")
    assert (ref.bucket, ref.prefix, ref.rev) == ("models", "org/llama/v1", REV[:8])
    assert str(ref) == f"s3://models/org/llama/v1@{REV[:8]}"


def test_trailing_slash_is_the_same_prefix() -> None:
    assert parse_ref("s3://models/llama/") == parse_ref("s3://models/llama")


def test_file_ref() -> None:
    ref = parse_ref(f"file:///mnt/models/llama@{REV}")
    assert (ref.scheme, ref.prefix, ref.rev) == ("file", "/mnt/models/llama", REV)
    assert ref.location == "file:///mnt/models/llama"


def test_bare_name_uses_default_bucket() -> None:
    assert parse_ref("llama", default_bucket="models") == Ref("s3", "models", "llama", None)


def test_bare_name_without_default_bucket_says_how_to_fix() -> None:
    with pytest.raises(RefInvalid) as info:
        parse_ref("llama")
    assert info.value.code == "ref_invalid"
    assert "default bucket" in str(info.value)
    assert info.value.hint and "WEIGHTCACHE_S3_DEFAULT_BUCKET" in info.value.hint


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "1 to"),
        ("s3://", "bucket"),
        ("s3://models", "no prefix"),
        ("s3://models/", "no prefix"),
        ("s3://Models/x", "bucket"),
        ("s3://a/x", "bucket"),
        ("s3://models/../etc", "'..' segment"),
        ("s3://models/a/./b", "'.' segment"),
        ("s3://models/a//b", "empty segment"),
        ("s3://models/a\\b", "backslash"),
        ("s3://models/a\x00b", "control"),
        ("s3://models/x@zz", "revision"),
        ("s3://models/x@abc", "revision"),
        ("s3://models/x@" + "A" * 64, "revision"),
        ("file://relative/path", "absolute"),
        ("file:///", "no prefix"),
        ("file:///a/../b", "'..' segment"),
        ("http://example/x", "unsupported scheme"),
        (" s3://models/x", "whitespace"),
        ("s3://models/" + "a" * 3000, "1 to"),
    ],
)
def test_bad_refs(text: str, needle: str) -> None:
    with pytest.raises(RefInvalid) as info:
        parse_ref(text, default_bucket="models")
    assert needle in str(info.value)


def test_non_string_ref() -> None:
    with pytest.raises(RefInvalid):
        parse_ref(123)  # type: ignore[arg-type]


@given(st.text(max_size=300))
def test_parse_never_crashes(text: str) -> None:
    try:
        ref = parse_ref(text, default_bucket="models")
    except RefInvalid as exc:
        assert exc.code == "ref_invalid"
        return
    # Whatever parses round-trips and stays inside its prefix.
    assert parse_ref(str(ref), default_bucket="models") == ref
    assert ".." not in ref.prefix.split("/")


_segment = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12
).filter(lambda s: s not in (".", ".."))


@given(
    st.lists(_segment, min_size=1, max_size=5),
    st.one_of(st.none(), st.text(alphabet="0123456789abcdef", min_size=6, max_size=64)),
)
def test_valid_s3_refs_round_trip(segments: list[str], rev: str | None) -> None:
    text = "s3://models/" + "/".join(segments) + (f"@{rev}" if rev else "")
    ref = parse_ref(text)
    assert ref.prefix == "/".join(segments)
    assert ref.rev == rev
    assert str(ref) == text
    assert "/" not in ref.location_key
