"""Manifest validation: traversal, duplicates, sizes and chunk lists that disagree."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightcache.errors import ManifestInvalid
from weightcache.hashing import digest_bytes, digest_stream
from weightcache.manifest import FORMAT, build, dump, n_chunks, parse

H = "0" * 64


def entry(
    path: str = "model.safetensors", size: int = 10, chunk_size: int = 4096, **kw: Any
) -> dict[str, Any]:
    doc = {
        "path": path,
        "size": size,
        "blake3": H,
        "chunk_size": chunk_size,
    }
    if "chunks" not in kw:
        doc["chunks"] = [H] * n_chunks(max(size, 0), chunk_size) if isinstance(size, int) else []
    doc.update(kw)
    return doc


def raw(*files: dict[str, Any], **top: Any) -> bytes:
    doc = {"format": FORMAT, "files": list(files)}
    doc.update(top)
    return json.dumps(doc).encode()


def test_round_trip_and_revision_is_hash_of_bytes() -> None:
    d = digest_stream([b"x" * 10000], 4096)
    manifest = build([("b.bin", d), ("a/c.json", digest_stream([b"{}"], 4096))], 4096)
    data = dump(manifest)
    parsed, rev = parse(data)
    assert parsed == manifest
    assert rev == digest_bytes(data)
    assert [f.path for f in parsed.files] == ["a/c.json", "b.bin"]
    assert parsed.file("b.bin").chunk_range(2) == (8192, 10000 - 8192)
    # Canonical: the same content always gives the same bytes, so the same revision.
    assert dump(build([("a/c.json", digest_stream([b"{}"], 4096)), ("b.bin", d)], 4096)) == data


def test_empty_file_has_no_chunks() -> None:
    parsed, _ = parse(raw(entry(size=0)))
    assert parsed.files[0].chunks == ()


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("../etc/passwd", "'..' segment"),
        ("a/../../b", "'..' segment"),
        ("/etc/passwd", "absolute"),
        ("a\\..\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("a//b", "empty segment"),
        ("a/", "empty segment"),
        ("./a", "'.' segment"),
        ("", "empty"),
        ("weightcache.manifest.json", "reserved"),
        (".weightcache/revisions/x.json", "reserved"),
        ("a" * 2000, "longer"),
    ],
)
def test_paths_that_escape_or_collide_are_refused(path: str, needle: str) -> None:
    with pytest.raises(ManifestInvalid) as info:
        parse(raw(entry(path=path)))
    assert needle in str(info.value)
    assert info.value.code == "manifest_invalid"


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (raw(entry(), entry()), "duplicate path"),
        (raw(entry(path="a"), entry(path="a/b")), "lies under file"),
        (raw(entry(size=10000, chunk_size=4096, chunks=[H])), "lists 1 chunks"),
        (raw(entry(size=-1, chunks=[])), "out of range"),
        (raw(entry(size=1 << 60, chunks=[])), "out of range"),
        (raw(entry(size=True, chunks=[H])), "must be an integer"),
        (raw(entry(size="10")), "must be an integer"),
        (raw(entry(chunk_size=100, chunks=[H])), "chunk_size"),
        (raw(entry(blake3="xyz")), "blake3"),
        (raw(entry(blake3="A" * 64)), "blake3"),
        (raw(entry(chunks=["nope"])), "chunks"),
        (raw(entry(extra=1)), "unknown fields"),
        (raw(entry(), extra=1), "unknown top-level"),
        (raw(entry(), format="v0"), "format"),
        (b"[1,2]", "JSON object"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{not json", "not JSON"),
        (json.dumps({"format": FORMAT, "files": {}}).encode(), "files must be a list"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ],
)
def test_inconsistent_manifests_are_refused(doc: bytes, needle: str) -> None:
    with pytest.raises(ManifestInvalid) as info:
        parse(doc)
    assert needle in str(info.value)


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(ManifestInvalid):
        parse(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.fixed_dictionaries(
        {
            "path": st.one_of(st.text(max_size=40), json_values),
            "size": st.one_of(st.integers(min_value=-(2**70), max_value=2**70), json_values),
            "blake3": st.one_of(st.just(H), json_values),
            "chunk_size": st.one_of(st.integers(min_value=-10, max_value=2**31), json_values),
            "chunks": st.one_of(st.lists(st.just(H), max_size=5), json_values),
        }
    )
)
def test_hostile_entries_are_refused_or_consistent(e: dict[str, Any]) -> None:
    try:
        manifest, _ = parse(raw(e))
    except ManifestInvalid:
        return
    f = manifest.files[0]
    assert len(f.chunks) == n_chunks(f.size, f.chunk_size)
    assert not f.path.startswith("/") and ".." not in f.path.split("/")
