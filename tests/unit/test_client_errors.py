"""The client's errors are specific: a daemon answering garbage is response_invalid,
a cached file that cannot be read is cache_corrupt or cache_io_error, never a bare
OSError or the root class."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from weightcache.client.daemon import DaemonClient
from weightcache.client.loader import _read
from weightcache.client.report import LoadReport
from weightcache.client.selection import make_selector
from weightcache.errors import CacheCorrupt, CacheIOError, ResponseInvalid
from weightcache.results import Ensured, LocalFile


def _ensured(local: Path) -> Ensured:
    return Ensured(
        ref="m@" + "a" * 64,
        revision="a" * 64,
        snapshot=local.parent,
        files=[LocalFile("model.safetensors", local, 8, "b" * 64)],
        cache_hit=True,
    )


def test_a_missing_cached_file_is_cache_corrupt(tmp_path: Path) -> None:
    with pytest.raises(CacheCorrupt) as info:
        _read(
            _ensured(tmp_path / "gone.safetensors"),
            make_selector(None),
            torch.device("cpu"),
            None,
            LoadReport(),
        )
    assert info.value.code == "cache_corrupt"
    assert "verify --repair" in (info.value.hint or "")


def test_an_unreadable_cached_file_is_cache_io_error(tmp_path: Path) -> None:
    # A directory where the file should be: open() fails with EISDIR (as root,
    # permissions would not stop us).
    local = tmp_path / "model.safetensors"
    local.mkdir()
    with pytest.raises(CacheIOError) as info:
        _read(_ensured(local), make_selector(None), torch.device("cpu"), None, LoadReport())
    assert info.value.code == "cache_io_error"
    assert info.value.facts["path"] == str(local)


@pytest.fixture
def garbage_daemon(tmp_path: Path) -> Iterator[Path]:
    """A socket that answers every request with 200 and a body that is not JSON."""
    path = tmp_path / "g.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.fspath(path))
    server.listen(4)
    server.settimeout(0.05)  # so that the thread sees the stop promptly
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.recv(65536)
                body = b"<html>a proxy page</html>"
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s" % (len(body), body)
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(timeout=2)
        server.close()


def test_a_daemon_answering_garbage_is_response_invalid(garbage_daemon: Path) -> None:
    client = DaemonClient(socket_path=garbage_daemon)
    with pytest.raises(ResponseInvalid) as info:
        client.status()
    assert info.value.code == "response_invalid"
