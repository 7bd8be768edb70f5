"""The daemon's listeners: the Unix-socket app and, optionally, the TCP app.

Kept here, not in :mod:`weightcache.daemon`, so that the aiohttp server is
imported under ``weightcache/api/`` only.
"""

from __future__ import annotations

import logging
import socket

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from weightcache.api.app import make_app
from weightcache.config import Config
from weightcache.errors import ConfigInvalid
from weightcache.service import Service

log = logging.getLogger(__name__)


class _ProtocolErrors(logging.Filter):
    """aiohttp logs what its parser refuses at ERROR, quoting the offending raw line
    (an Authorization header with its token, say): one line at DEBUG instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = (
                "http.bad_request status=%s error=%s",
                (
                    exc.code,
                    type(exc).__name__,
                ),
            )
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
        return True


#: aiohttp's server-side messages, filtered
_protocol_log = logging.getLogger("weightcache.api.http")
_protocol_log.addFilter(_ProtocolErrors())

#: pending connections per listener: a node's workers cold-start all at once
BACKLOG = 1024
#: after the service has closed, handlers still running (a stream writing its
#: last line) get this long before they are cancelled
HANDLER_GRACE_S = 2.0


class Listeners:
    """One aiohttp runner per listener, started and stopped together."""

    def __init__(self, service: Service, cfg: Config) -> None:
        self.service = service
        self.cfg = cfg
        self._runners: list[web.AppRunner] = []
        #: where the TCP listener is bound (``HOST:PORT``), once started
        self.tcp_addresses: list[str] = []

    async def _runner(self, *, tcp: bool) -> web.AppRunner:
        # No aiohttp access log: the error middleware logs request.done with the
        # request id, and nothing logs headers (the bearer token is one).
        runner = web.AppRunner(
            make_app(self.service, self.cfg, tcp=tcp),
            access_log=None,
            logger=_protocol_log,
            shutdown_timeout=HANDLER_GRACE_S,
            # A worker holds its connection open while it holds a lease bound to it;
            # an idle close here would end the lease early. The lease's TTL bounds it.
            keepalive_timeout=self.cfg.daemon.lease_ttl_s,
        )
        self._runners.append(runner)
        await runner.setup()
        return runner

    async def start(self, unix_sock: socket.socket) -> None:
        """Serve the Unix app on ``unix_sock`` (bound by the caller) and TCP if configured."""
        unix = await self._runner(tcp=False)
        # A socket bound by the daemon itself (umask, lock, stale-file check):
        # UnixSite would bind with the process umask and chmod afterwards.
        await web.SockSite(unix, unix_sock, backlog=BACKLOG).start()
        listen = self.cfg.daemon.listen
        if not listen:
            return
        tcp = await self._runner(tcp=True)
        host, _, port = listen.rpartition(":")
        try:
            await web.TCPSite(tcp, host.strip("[]"), int(port), backlog=BACKLOG).start()
        except OSError as exc:
            raise ConfigInvalid(
                [f"daemon.listen: cannot listen on {listen}: {exc.strerror or exc}"]
            ) from exc
        self.tcp_addresses = [_address(a) for a in tcp.addresses]

    async def close(self) -> None:
        """Stop accepting, give running handlers a short grace, then cancel them."""
        while self._runners:
            await self._runners.pop().cleanup()


def _address(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)
