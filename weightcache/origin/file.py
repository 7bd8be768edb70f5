"""``file://`` origin: a local or mounted directory (NFS, a read-only volume, ...)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from weightcache.errors import ObjectNotFound, OriginRejected, OriginUnavailable
from weightcache.manifest import path_problem
from weightcache.origin.base import ObjectInfo

_PIECE = 1 << 20


class FileOrigin:
    """Keys are paths relative to ``root``; every key is checked to stay inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = f"file://{root}"

    def _path(self, key: str) -> Path:
        problem = path_problem(key)
        if problem:
            raise OriginRejected(f"refusing key {key!r} under {self.name}: {problem}", key=key)
        return self.root / key

    def read(self, key: str, *, max_bytes: int) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.name}/{key} does not exist", key=key) from exc
        except IsADirectoryError as exc:
            raise ObjectNotFound(f"{self.name}/{key} is a directory", key=key) from exc
        except OSError as exc:
            raise OriginUnavailable(f"reading {self.name}/{key}: {exc.strerror}", key=key) from exc
        if len(data) > max_bytes:
            raise OriginRejected(f"{self.name}/{key} is larger than {max_bytes} bytes", key=key)
        return data

    @contextmanager
    def open_range(self, key: str, offset: int, length: int) -> Iterator[Iterator[bytes]]:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.name}/{key} does not exist", key=key) from exc
        except OSError as exc:
            raise OriginUnavailable(f"opening {self.name}/{key}: {exc.strerror}", key=key) from exc

        def pieces() -> Iterator[bytes]:
            done = 0
            while done < length:
                try:
                    piece = os.pread(fd, min(_PIECE, length - done), offset + done)
                except OSError as exc:
                    raise OriginUnavailable(
                        f"reading {self.name}/{key}: {exc.strerror}", key=key
                    ) from exc
                if not piece:
                    raise OriginUnavailable(
                        f"{self.name}/{key} ended at byte {offset + done}, "
                        f"expected {offset + length}",
                        key=key,
                    )
                done += len(piece)
                yield piece

        try:
            yield pieces()
        finally:
            os.close(fd)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath) / name
                if full.is_symlink() or not full.is_file():
                    continue
                yield ObjectInfo(full.relative_to(self.root).as_posix(), full.stat().st_size)

    def _atomic_write(self, key: str, write: object) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".wc-upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                assert callable(write)
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with _suppress_oserror():
                os.unlink(tmp)
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def write_file(self, key: str, path: Path, *, part_bytes: int) -> None:
        def copy(f: object) -> None:
            with open(path, "rb") as src:
                while piece := src.read(part_bytes):
                    f.write(piece)  # type: ignore[attr-defined]

        self._atomic_write(key, copy)

    def close(self) -> None:
        return None


@contextmanager
def _suppress_oserror() -> Iterator[None]:
    try:
        yield
    except OSError:
        return
