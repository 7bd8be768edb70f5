"""Running the node daemon: the service, its Unix socket, its TCP listener, signals.

Start-up order matters: the socket is claimed (lock, stale-file check, bind)
before the service opens the cache, so a second daemon for the same socket
fails before touching anything; the TCP port is bound before ``daemon.started``
is logged, so a port conflict is an error at start, not a silent half-daemon.

Shutdown on SIGTERM or SIGINT: the service stops taking work (new requests get
``shutting_down``, readiness turns false), in-flight pulls get
``daemon.shutdown_timeout_s`` to checkpoint, then the listeners close and the
remaining handlers get a short grace. A second signal cancels at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from weightcache.api.server import BACKLOG, Listeners
from weightcache.config import Config
from weightcache.errors import ConfigInvalid
from weightcache.peers.setup import check_peers
from weightcache.service import Service

log = logging.getLogger(__name__)

#: the socket's mode: workers in the socket's group may connect, nobody else
SOCKET_MODE = 0o660
#: how long a connect to an existing socket file may take to count as "a daemon answers"
PROBE_TIMEOUT_S = 1.0


def run_daemon(
    cfg: Config, *, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean shutdown.

    ``loop_factory`` picks the event loop (the CLI passes uvloop's).
    """
    check_exposure(cfg)
    check_peers(cfg)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            return runner.run(serve(cfg))
        except asyncio.CancelledError:
            return 1  # a second signal: stopped without waiting for pulls to checkpoint


def check_exposure(cfg: Config) -> None:
    """Refuse to open admin and blob routes to the network without a token.

    Checked when the daemon starts, not when the config loads: clients read the
    same file and need no token of their own.
    """
    listen = cfg.daemon.listen
    if not listen or cfg.daemon.token:
        return
    host = listen.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigInvalid(
            [
                f"daemon.listen: {listen} is reachable beyond this host, so a bearer token "
                "is required: set WEIGHTCACHE_TOKEN or daemon.token_file, or listen on "
                "127.0.0.1"
            ]
        )


async def serve(cfg: Config) -> int:
    loop = asyncio.get_running_loop()
    claim = await asyncio.to_thread(_claim_socket, cfg.socket_path)
    stop = asyncio.Event()
    main = asyncio.current_task()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("daemon.stopping signal=%s", signal.Signals(signum).name)
            stop.set()
        elif main is not None:
            log.warning("daemon.abort signal=%s (second signal)", signal.Signals(signum).name)
            main.cancel()

    service: Service | None = None
    listeners: Listeners | None = None
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        service = Service(cfg)
        await service.start()
        listeners = Listeners(service, cfg)
        await listeners.start(claim.sock)
        log.info(
            "daemon.started pid=%d socket=%s listen=%s auth=%s cache=%s loop=%s",
            os.getpid(),
            cfg.socket_path,
            ", ".join(listeners.tcp_addresses) or "-",
            "token" if cfg.daemon.token else "none",
            cfg.cache.dir,
            type(loop).__module__.partition(".")[0],
        )
        await stop.wait()
        # Stop taking work first: requests that arrive meanwhile are answered
        # (shutting_down, readiness false) instead of finding a dead socket.
        await service.close()
        return 0
    finally:
        if listeners is not None:
            await listeners.close()
        if service is not None:
            await service.close()  # a no-op after a clean stop; closes on errors
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await asyncio.to_thread(claim.release)
        log.info("daemon.stopped pid=%d", os.getpid())


@dataclass
class _Claim:
    """The daemon's hold on its socket path: a lock for its lifetime, and the bound socket."""

    path: Path
    lock_fd: int
    sock: socket.socket

    def release(self) -> None:
        self.sock.close()
        # Only the lock holder may remove the path: it is ours until the lock goes.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.lock_fd)


def _claim_socket(path: Path) -> _Claim:
    """Lock ``path``, remove a stale socket file left by a crash, bind and listen.

    The lock (``flock`` on ``PATH.lock``, released by the kernel if the daemon
    dies) closes the race of two daemons starting together; the probe refuses
    a live daemon that predates the lock.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigInvalid(
            [f"daemon.socket_path: cannot create {path.parent}: {exc.strerror}"]
        ) from exc
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigInvalid(
            [f"daemon.socket_path: cannot open {lock_path}: {exc.strerror}"]
        ) from exc
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _already_running(path) from None
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The file mode comes from the umask at bind: set it so the socket is
            # never, even briefly, connectable by others.
            old = os.umask(0o777 & ~SOCKET_MODE)
            try:
                sock.bind(os.fspath(path))
            finally:
                os.umask(old)
            os.chmod(path, SOCKET_MODE)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigInvalid(
                [f"daemon.socket_path: cannot listen on {path}: {exc.strerror or exc}"]
            ) from exc
    except BaseException:
        os.close(lock_fd)
        raise
    return _Claim(path, lock_fd, sock)


def _remove_stale(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigInvalid(
            [f"daemon.socket_path: {path} exists and is not a socket; not removing it"]
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(os.fspath(path))
    except OSError as exc:
        # Refused: nobody listens, the file is a leftover of a daemon that died.
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigInvalid(
                [f"daemon.socket_path: cannot check {path}: {exc.strerror or exc}"]
            ) from exc
    else:
        raise _already_running(path)
    finally:
        probe.close()
    log.info("daemon.stale_socket path=%s removed=true", path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _already_running(path: Path) -> ConfigInvalid:
    return ConfigInvalid(
        [
            f"daemon.socket_path: another daemon is already serving {path}; stop it first, "
            "or give this one another --socket (and --cache-dir)"
        ]
    )
