"""The daemon's HTTP API in-process: a real Service over a file:// origin, aiohttp's test server.

Every route's happy path, the one error shape for every way a request can be
wrong, auth on the TCP app, the NDJSON stream, the peer pid over a real Unix
socket, and the documents (/metrics, /v1/openapi.json) checked against the
app's own router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from weightcache.api import bodies, make_app, metrics
from weightcache.config import Config, load_config
from weightcache.errors import Overloaded, RequestInvalid, UnsupportedMediaType
from weightcache.hashing import digest_bytes
from weightcache.publish import publish
from weightcache.refs import parse_ref
from weightcache.scheduler import Priority
from weightcache.service import Service

MB = 1_000_000
TOKEN = "s3cr3t-token-for-tests"


def make_model(root: Path, name: str, size: int, seed: int, chunk: str = "256KiB") -> str:
    src = root / "src" / name
    src.mkdir(parents=True)
    (src / "weights.bin").write_bytes(random.Random(seed).randbytes(size))
    (src / "config.json").write_text(json.dumps({"name": name}))
    ref = f"file://{root}/origin/{name}"
    publish(src, parse_ref(ref), load_config(env={"WEIGHTCACHE_PUBLISH_CHUNK_BYTES": chunk}))
    return ref


def config(root: Path, **env: str) -> Config:
    return load_config(
        env={
            "WEIGHTCACHE_CACHE_DIR": str(root / "cache"),
            "WEIGHTCACHE_CACHE_RESERVE_BYTES": "0",
            **env,
        }
    )


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    service: Service
    cfg: Config
    ref: str
    root: Path

    async def json(
        self, method: str, path: str, status: int, *, json_type: bool = True, **kwargs: Any
    ) -> Any:
        """The answer's JSON; a POST or DELETE declares application/json unless told not to."""
        if json_type and method in ("POST", "DELETE"):
            kwargs["headers"] = {"Content-Type": "application/json", **kwargs.get("headers", {})}
        resp = await self.client.request(method, path, **kwargs)
        body = await resp.text()
        assert resp.status == status, body
        assert resp.headers.get("X-Request-Id"), "every response carries a request id"
        return json.loads(body)

    async def error(self, method: str, path: str, status: int, code: str, **kwargs: Any) -> Any:
        doc = await self.json(method, path, status, **kwargs)
        assert set(doc) == {"error"}, doc
        err = doc["error"]
        assert err["code"] == code, err
        assert isinstance(err["message"], str) and err["message"]
        assert err["request_id"]
        assert set(err) <= {"code", "message", "hint", "details", "request_id"}
        return err


@contextlib.asynccontextmanager
async def serving(
    root: Path, *, tcp: bool = False, start: bool = True, **env: str
) -> AsyncIterator[Api]:
    ref = make_model(root, "m", 3 * MB, 1)
    cfg = config(root, **env)
    service = Service(cfg)
    if start:
        await service.start()
    try:
        async with TestClient(TestServer(make_app(service, cfg, tcp=tcp))) as client:
            yield Api(client, service, cfg, ref, root)
    finally:
        await service.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with serving(tmp_path) as a:
        yield a


# -- happy paths ----------------------------------------------------------------------


async def test_ensure_returns_files_source_and_lease(api: Api) -> None:
    doc = await api.json("POST", "/v1/ensure", 200, json={"ref": api.ref})
    assert doc["source"] == "origin" and doc["cache_hit"] is False and doc["coalesced"] is False
    assert doc["origin_bytes"] == doc["total_bytes"] > 3 * MB
    by_path = {f["path"]: f for f in doc["files"]}
    local = Path(by_path["weights.bin"]["local_path"])
    assert local.read_bytes() == (api.root / "src/m/weights.bin").read_bytes()
    assert by_path["weights.bin"]["blake3"] == digest_bytes(local.read_bytes())
    assert doc["lease"]["revision"] == doc["revision"]
    assert doc["lease"]["pid"] is None  # over TCP there is no peer pid

    again = await api.json(
        "POST", "/v1/ensure", 200, json={"ref": api.ref, "lease": False, "priority": "admin"}
    )
    assert again["source"] == "cache" and again["cache_hit"] is True and again["lease"] is None


async def test_ensure_stream_is_throttled_ndjson_ending_with_the_result(tmp_path: Path) -> None:
    # 4 KiB chunks: about two thousand progress reports for the service to make.
    async with serving(tmp_path) as api:
        big = make_model(tmp_path, "big", 8 * MB, 2, chunk="4KiB")
        started = time.monotonic()
        resp = await api.client.post("/v1/ensure", json={"ref": big, "stream": True})
        raw = await resp.read()
        elapsed = time.monotonic() - started
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        assert resp.headers["X-Request-Id"]
        lines = [json.loads(line) for line in raw.splitlines()]
        assert lines[-1]["event"] == "result"
        result = lines[-1]["result"]
        assert result["source"] == "origin" and result["total_bytes"] > 8 * MB
        progress = [x for x in lines[:-1] if x["event"] == "progress"]
        assert len(progress) == len(lines) - 1
        assert progress, "a pull reports progress"
        # At most about ten a second, and the last one always: done == total.
        assert len(progress) <= elapsed / 0.1 + 2, (len(progress), elapsed)
        assert progress[-1]["done_bytes"] == progress[-1]["total_bytes"] == result["total_bytes"]
        assert {"done_bytes", "total_bytes", "rate_bytes_per_s", "source", "ref"} <= set(
            progress[-1]
        )

        # A cache hit streams too: one progress line at 100 %, then the result.
        resp = await api.client.post("/v1/ensure", json={"ref": big, "stream": True})
        lines = [json.loads(line) for line in (await resp.read()).splitlines()]
        assert [x["event"] for x in lines] == ["progress", "result"]
        assert lines[-1]["result"]["source"] == "cache"


async def test_stream_refused_at_once_keeps_its_status(api: Api) -> None:
    missing = f"file://{api.root}/origin/nothing-here"
    err = await api.error(
        "POST", "/v1/ensure", 404, "model_not_found", json={"ref": missing, "stream": True}
    )
    assert "nothing-here" in err["message"]


async def test_stream_failure_after_progress_is_an_error_line(tmp_path: Path) -> None:
    async with serving(tmp_path, WEIGHTCACHE_FETCH_HASH_RETRIES="0") as api:
        ref = make_model(tmp_path, "bad", 4 * MB, 3, chunk="64KiB")
        # The origin's copy rots after publishing: its last chunk no longer matches.
        origin_file = tmp_path / "origin/bad/weights.bin"
        data = bytearray(origin_file.read_bytes())
        data[-10] ^= 0xFF
        origin_file.write_bytes(bytes(data))
        resp = await api.client.post("/v1/ensure", json={"ref": ref, "stream": True})
        lines = [json.loads(line) for line in (await resp.read()).splitlines()]
        assert lines[-1]["event"] == "error", lines[-1]
        err = lines[-1]["error"]
        assert err["code"] == "hash_mismatch" and err["request_id"] == resp.headers["X-Request-Id"]
        assert all(x["event"] == "progress" for x in lines[:-1])


@pytest.mark.parametrize("stream", [True, False])
async def test_client_that_hangs_up_leaves_no_lease_behind(tmp_path: Path, stream: bool) -> None:
    # The daemon's own runner settings (aiohttp's test server cancels handlers
    # when a client leaves; the daemon lets the pull finish for the cache).
    # About a second past the rate limiter's one-second burst.
    ref = make_model(tmp_path, "m", 2 * MB, 1)
    cfg = config(tmp_path, WEIGHTCACHE_FETCH_MAX_BYTES_PER_S="1MiB")
    service = Service(cfg)
    await service.start()
    runner = web.AppRunner(make_app(service, cfg, tcp=True))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        body = json.dumps({"ref": ref, "stream": stream}).encode()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                b"POST /v1/ensure HTTP/1.1\r\nHost: daemon\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()
            if stream:
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                await reader.readline()  # the chunk's size
                assert b'"event":"progress"' in await reader.readline()
        finally:
            writer.close()  # hang up mid-pull
            await writer.wait_closed()
        for _ in range(200):
            if service.counters["misses"] == 1:
                break
            await asyncio.sleep(0.05)
        assert service.counters["misses"] == 1, "the pull finished for the cache"
        # Granted in the same step that counted the miss; dropped once the
        # handler sees its client gone.
        for _ in range(100):
            if not service.leased_revisions():
                break
            await asyncio.sleep(0.02)
        assert not service.leased_revisions()
    finally:
        await runner.cleanup()
        await service.close()


async def test_prefetch_jobs_and_job(api: Api) -> None:
    later = "2999-01-01T00:00:00Z"
    doc = await api.json(
        "POST", "/v1/prefetch", 202, json={"ref": api.ref, "at": later, "priority": "background"}
    )
    job = doc["job"]
    assert doc["created"] is True and job["state"] == "scheduled"
    assert job["at"] == datetime(2999, 1, 1, tzinfo=UTC).timestamp()
    assert job["priority"] == "background"
    again = await api.json("POST", "/v1/prefetch", 202, json={"ref": api.ref, "at": later})
    assert again["created"] is False and again["job"]["id"] == job["id"]

    now = await api.json("POST", "/v1/prefetch", 202, json={"ref": api.ref, "at": None})
    listed = await api.json("GET", "/v1/jobs", 200)
    assert {j["id"] for j in listed["jobs"]} == {job["id"], now["job"]["id"]}
    one = await api.json("GET", f"/v1/jobs/{job['id']}", 200)
    assert one["job"]["id"] == job["id"]

    # The immediate job runs in the background; poll it briefly.
    for _ in range(100):
        state = (await api.json("GET", f"/v1/jobs/{now['job']['id']}", 200))["job"]
        if state["state"] in ("done", "failed"):
            break
        await asyncio.sleep(0.05)
    assert state["state"] == "done", state
    assert state["done_bytes"] == state["total_bytes"] > 3 * MB


async def test_recurring_prefetch_is_a_schedule_listed_fetched_and_removed(api: Api) -> None:
    body = {
        "ref": api.ref,
        "schedule": "0 9 * * 1-5",
        "tz": "Europe/Berlin",
        "lead_s": 900,
        "hold_s": 3600,
    }
    headers = {"Content-Type": "application/json"}
    resp = await api.client.post("/v1/prefetch", json=body, headers=headers)
    assert resp.status == 201, await resp.text()
    doc = await resp.json()
    sched = doc["schedule"]
    assert resp.headers["Location"] == f"/v1/schedules/{sched['id']}"
    assert doc["created"] is True and sched["every"] == "0 9 * * 1-5"
    assert (sched["tz"], sched["lead_s"], sched["hold_s"]) == ("Europe/Berlin", 900, 3600)
    assert sched["pin"] is None and sched["source"] == "admin" and sched["peak"] > time.time()
    job = doc["job"]
    assert job["schedule"] == sched["id"] and job["deadline"] == sched["peak"]
    assert job["at"] == sched["peak"] - 900 and job["state"] == "scheduled"

    again = await api.json("POST", "/v1/prefetch", 200, json={**body, "schedule": "0 9 * * 1-5 "})
    assert again["created"] is False and again["schedule"]["id"] == sched["id"]
    listed = await api.json("GET", "/v1/schedules", 200)
    assert [s["id"] for s in listed["schedules"]] == [sched["id"]]
    one = await api.json("GET", f"/v1/schedules/{sched['id']}", 200)
    assert one["schedule"]["peak"] == sched["peak"]
    jobs = (await api.json("GET", "/v1/jobs", 200))["jobs"]
    assert [j["id"] for j in jobs if j["schedule"] == sched["id"]] == [job["id"]]
    status = await api.json("GET", "/v1/status", 200)
    assert status["prefetch"]["schedules"][0]["id"] == sched["id"] and status["pins"] == []

    removed = await api.json("DELETE", f"/v1/schedules/{sched['id']}", 200)
    assert removed["removed"] == sched["id"] and removed["job_cancelled"] == job["id"]
    await api.error("GET", f"/v1/schedules/{sched['id']}", 404, "not_found")
    await api.error("DELETE", f"/v1/schedules/{sched['id']}", 404, "not_found")
    await api.error("GET", f"/v1/jobs/{job['id']}", 404, "not_found")
    assert (await api.json("GET", "/v1/schedules", 200)) == {"schedules": []}


async def test_recurring_prefetch_refusals_name_the_field(api: Api) -> None:
    for extra, field in (
        ({"schedule": "0 25 * * *"}, "schedule"),
        ({"schedule": "not cron"}, "schedule"),
        ({"schedule": "* * * * *"}, "schedule"),
        ({"schedule": "0 9 * * *", "tz": "Mars/Olympus_Mons"}, "tz"),
        ({"schedule": "0 9 * * *", "lead_s": -60}, "lead_s"),
        ({"schedule": "0 9 * * *", "hold_s": -1}, "hold_s"),
        ({"schedule": "0 9 * * *", "at": 4102444800}, "at"),
        ({"tz": "UTC"}, "tz"),
    ):
        err = await api.error(
            "POST", "/v1/prefetch", 400, "request_invalid", json={"ref": api.ref, **extra}
        )
        assert err["details"]["field"] == field, (extra, err)
    assert (await api.json("GET", "/v1/schedules", 200)) == {"schedules": []}


async def test_forecast_lists_models_seen(api: Api) -> None:
    await api.json("POST", "/v1/ensure", 200, json={"ref": api.ref, "lease": False})
    doc = await api.json("GET", "/v1/forecast", 200)
    [row] = doc["models"]
    assert row["requests"] == 1 and row["misses"] == 1 and row["suggestions"] == []
    assert doc["auto"]["enabled"] is False and doc["tz"] == "UTC"


async def test_metrics_name_the_recurring_prefetch_families(api: Api) -> None:
    await api.json("POST", "/v1/prefetch", 201, json={"ref": api.ref, "schedule": "0 9 * * *"})
    text = await (await api.client.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["weightcache_prefetch_jobs"].type == "counter"
    outcomes = {s.labels["outcome"] for s in families["weightcache_prefetch_jobs"].samples}
    assert outcomes == {"on_time", "late", "failed", "missed"}
    assert families["weightcache_schedule_margin_seconds"].type == "gauge"
    [window] = families["weightcache_schedule_window_misses"].samples
    assert window.value == 0 and window.labels["schedule"]
    for name in ("schedules", "pins", "pinned_bytes"):
        assert families[f"weightcache_{name}"].type == "gauge"
    assert families["weightcache_schedules"].samples[0].value == 1


async def test_status_counts_hits_and_misses(api: Api) -> None:
    await api.json("POST", "/v1/ensure", 200, json={"ref": api.ref, "lease": False})
    await api.json("POST", "/v1/ensure", 200, json={"ref": api.ref, "lease": False})
    status = await api.json("GET", "/v1/status", 200)
    assert status["counters"]["hits"] == 1 and status["counters"]["misses"] == 1
    assert status["disk"]["used_bytes"] > 3 * MB
    assert [m["state"] for m in status["models"]] == ["cached"]


async def test_evict_refused_while_leased_then_forced_and_release(api: Api) -> None:
    doc = await api.json("POST", "/v1/ensure", 200, json={"ref": api.ref})
    lease_id = doc["lease"]["id"]
    await api.error("DELETE", "/v1/models", 409, "model_leased", json={"ref": api.ref})
    released = await api.json("POST", f"/v1/leases/{lease_id}/release", 200)
    assert released == {"released": lease_id}
    await api.error("POST", f"/v1/leases/{lease_id}/release", 404, "not_found")
    gone = await api.json("DELETE", "/v1/models", 200, json={"ref": api.ref})
    assert gone["revision"] == doc["revision"] and gone["freed_bytes"] == doc["total_bytes"]
    await api.error("DELETE", "/v1/models", 404, "model_not_found", json={"ref": api.ref})

    doc = await api.json("POST", "/v1/ensure", 200, json={"ref": api.ref})
    forced = await api.json("DELETE", "/v1/models", 200, json={"ref": api.ref, "force": True})
    assert forced["forced"] is True


async def test_blob_whole_range_and_head(api: Api) -> None:
    doc = await api.json("POST", "/v1/ensure", 200, json={"ref": api.ref, "lease": False})
    entry = next(f for f in doc["files"] if f["path"] == "weights.bin")
    data = Path(entry["local_path"]).read_bytes()
    url = f"/v1/blobs/{entry['blake3']}"

    resp = await api.client.get(url)
    assert resp.status == 200 and await resp.read() == data
    assert resp.headers["X-Request-Id"]
    resp = await api.client.get(url, headers={"Range": "bytes=1000-1999"})
    assert resp.status == 206 and await resp.read() == data[1000:2000]
    resp = await api.client.head(url)
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(data)

    served = (await api.json("GET", "/v1/status", 200))["counters"]["peer_bytes_served"]
    assert served == len(data) + 1000


@pytest.mark.parametrize(
    "digest",
    [
        "abc",
        "A" * 64,
        "g" * 64,
        "0" * 65,
        "..%2F..%2Fblobs",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "snapshots",
    ],
)
async def test_blob_refuses_anything_but_a_full_digest(api: Api, digest: str) -> None:
    err = await api.error("GET", f"/v1/blobs/{digest}", 400, "request_invalid")
    assert err["details"]["field"] == "digest"


async def test_blob_not_held_is_404(api: Api) -> None:
    await api.error("GET", f"/v1/blobs/{'0' * 64}", 404, "not_found")


async def test_healthz_ready_and_not_ready(tmp_path: Path) -> None:
    async with serving(tmp_path) as api:
        doc = await api.json("GET", "/healthz", 200)
        assert doc["live"] is True and doc["ready"] is True
    async with serving(tmp_path / "cold", start=False) as api:
        doc = await api.json("GET", "/healthz", 503)
        assert doc["live"] is True and doc["ready"] is False


# -- documents --------------------------------------------------------------------------


async def test_metrics_parse_and_name_every_family(api: Api) -> None:
    await api.json("POST", "/v1/ensure", 200, json={"ref": api.ref, "lease": False})
    await api.json("POST", "/v1/prefetch", 202, json={"ref": api.ref, "at": 4102444800})
    resp = await api.client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {s.name: s for f in families.values() for s in f.samples if not s.labels}
    for key in metrics.COUNTERS:
        assert families[f"weightcache_{key}"].type == "counter"
        assert f"weightcache_{key}_total" in samples
    for key in ("used_bytes", "budget_bytes", "reserve_bytes", "free_bytes"):
        assert families[f"weightcache_disk_{key}"].type == "gauge"
    for name in ("pulls_in_flight", "pending", "leases", "jobs"):
        assert families[f"weightcache_{name}"].type == "gauge"
    assert samples["weightcache_misses_total"].value == 1
    assert samples["weightcache_origin_bytes_total"].value > 3 * MB
    jobs = {s.labels["state"]: s.value for s in families["weightcache_jobs"].samples}
    assert jobs == {"scheduled": 1}
    assert all(name.startswith("weightcache_") for name in families)


def _router_operations(app: web.Application) -> set[tuple[str, str]]:
    ops = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert path, route
        ops.add((route.method.lower(), path))
    return ops


async def test_openapi_describes_exactly_the_routes(api: Api) -> None:
    doc = await api.json("GET", "/v1/openapi.json", 200)
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] and doc["info"]["version"]
    documented = {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch", "head", "options")
    }
    server = api.client.server
    assert isinstance(server, TestServer)
    routed = _router_operations(server.app)
    assert routed - documented == set(), "routes missing from the document"
    assert documented - routed == set(), "documented operations nobody routes"
    # Every $ref points at something that exists.
    schemas = doc["components"]["schemas"]
    responses = doc["components"]["responses"]
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    for ref in refs:
        kind, name = ref.removeprefix("#/components/").split("/", 1)
        assert name in {"schemas": schemas, "responses": responses}[kind], ref
    # Every operation says what its errors look like.
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "200" in op["responses"] or "202" in op["responses"], (method, path)
    assert "request_invalid" in schemas["ErrorBody"]["properties"]["code"]["enum"]


# -- errors ----------------------------------------------------------------------------


async def test_malformed_json_wrong_types_unknown_fields(api: Api) -> None:
    err = await api.error("POST", "/v1/ensure", 400, "request_invalid", data=b'{"ref": ')
    assert err["details"]["field"] == "body"
    err = await api.error("POST", "/v1/ensure", 400, "request_invalid", data=b"[1, 2]")
    assert "object" in err["message"]
    err = await api.error("POST", "/v1/ensure", 400, "request_invalid", data=b"")
    assert err["details"]["field"] == "body"
    err = await api.error("POST", "/v1/ensure", 400, "request_invalid", json={"ref": 5})
    assert err["details"]["field"] == "ref"
    err = await api.error("POST", "/v1/ensure", 400, "request_invalid", json={})
    assert err["details"]["field"] == "ref"
    err = await api.error(
        "POST", "/v1/ensure", 400, "request_invalid", json={"ref": api.ref, "stream": "yes"}
    )
    assert err["details"]["field"] == "stream"
    err = await api.error(
        "POST", "/v1/ensure", 400, "request_invalid", json={"ref": api.ref, "priority": "urgent"}
    )
    assert err["details"]["field"] == "priority"
    err = await api.error(
        "POST", "/v1/ensure", 400, "request_invalid", json={"ref": api.ref, "device": "cuda"}
    )
    assert err["details"]["field"] == "device" and "hint" in err
    err = await api.error(
        "POST", "/v1/prefetch", 400, "request_invalid", json={"ref": api.ref, "at": "tomorrow"}
    )
    assert err["details"]["field"] == "at"
    err = await api.error(
        "POST",
        "/v1/prefetch",
        400,
        "request_invalid",
        json={"ref": api.ref, "at": "2026-11-23T12:00:00"},  # no zone
    )
    assert err["details"]["field"] == "at"
    err = await api.error(
        "DELETE", "/v1/models", 400, "request_invalid", json={"ref": api.ref, "force": 1}
    )
    assert err["details"]["field"] == "force"
    err = await api.error(
        "POST", "/v1/leases/x/release", 400, "request_invalid", json={"why": "done"}
    )
    assert err["details"]["field"] == "why"
    await api.error("POST", "/v1/ensure", 400, "ref_invalid", json={"ref": "ftp://x/y"})


async def test_body_over_the_limit_is_413(api: Api) -> None:
    limit = api.cfg.daemon.max_body_bytes
    huge = json.dumps({"ref": "x" * (limit + 10)}).encode()
    err = await api.error("POST", "/v1/ensure", 413, "payload_too_large", data=huge)
    assert err["details"]["limit_bytes"] == limit

    async def chunks() -> AsyncIterator[bytes]:
        # Chunked, without a Content-Length: refused while reading.
        yield b'{"ref": "'
        for _ in range(limit // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    await api.error("POST", "/v1/ensure", 413, "payload_too_large", data=chunks())


BODY_ROUTES = [
    ("POST", "/v1/ensure"),
    ("POST", "/v1/prefetch"),
    ("POST", "/v1/leases/x/release"),
    ("DELETE", "/v1/models"),
]


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded"],
)
async def test_posts_and_deletes_must_declare_json_and_change_nothing_otherwise(
    api: Api, content_type: str | None
) -> None:
    doc = await api.json("POST", "/v1/ensure", 200, json={"ref": api.ref})
    lease_id = doc["lease"]["id"]
    before = (dict(api.service.counters), len(api.service.jobs()))
    headers = {} if content_type is None else {"Content-Type": content_type}
    # aiohttp's client would add application/octet-stream to a bytes body itself.
    skip = [] if content_type is not None else ["Content-Type"]
    for method, path in [*BODY_ROUTES, ("POST", f"/v1/leases/{lease_id}/release")]:
        for body in (json.dumps({"ref": api.ref}).encode(), None):
            err = await api.error(
                method,
                path,
                415,
                "unsupported_media_type",
                json_type=False,
                data=body,
                headers=headers,
                skip_auto_headers=skip,
            )
            assert err["details"]["content_types"] == ([content_type] if content_type else [])
            assert "application/json" in err["hint"]
    # Refused before any handler ran: no pull, no job, the lease still there.
    assert (dict(api.service.counters), len(api.service.jobs())) == before
    assert (await api.json("GET", "/v1/status", 200))["leases"] == 1
    # An empty body declared as JSON is what release takes.
    await api.json("POST", f"/v1/leases/{lease_id}/release", 200)


async def test_the_media_type_check_comes_after_routing_and_auth(tmp_path: Path) -> None:
    async with serving(tmp_path, tcp=True, WEIGHTCACHE_TOKEN=TOKEN) as api:
        plain = {"Content-Type": "text/plain"}
        await api.error("POST", "/v1/ensure", 401, "unauthorized", json_type=False, headers=plain)
        authed = {"Authorization": f"Bearer {TOKEN}", **plain}
        for method, path, status, code in (
            ("POST", "/v1/nope", 404, "not_found"),
            ("POST", "/v1/status", 405, "method_not_allowed"),
            ("DELETE", "/v1/jobs/x", 405, "method_not_allowed"),
            ("POST", "/v1/ensure", 415, "unsupported_media_type"),
        ):
            await api.error(method, path, status, code, json_type=False, headers=authed)
        good = {"Authorization": f"Bearer {TOKEN}"}
        # GET routes take no body and need no Content-Type.
        await api.json("GET", "/v1/status", 200, headers=good)


def test_require_json_accepts_only_application_json() -> None:
    for ok in (
        ["application/json"],
        ["Application/JSON"],
        ["application/json; charset=utf-8"],
        ["application/json;charset=latin-1"],
        ["application/json;"],
        ["application/json\t; x=1"],
        [" application/json "],
    ):
        bodies.require_json(ok, method="POST", path="/v1/ensure")
    for bad in (
        [],
        [""],
        ["text/plain"],
        ["text/plain; application/json"],
        ["application/x-www-form-urlencoded"],
        ["multipart/form-data; boundary=x"],
        ["application/jsonx"],
        ["application/json-seq"],
        ["application/vnd.api+json"],
        ["application/json, text/plain"],
        ["application/json x"],
        ['"application/json"'],
        ["text/json"],
        ["application/json", "application/json"],  # twice: which one would count?
        ["application/json", "text/plain"],
    ):
        with pytest.raises(UnsupportedMediaType) as info:
            bodies.require_json(bad, method="POST", path="/v1/ensure")
        assert info.value.http_status == 415
        assert info.value.facts["content_types"] == bad
        assert "POST /v1/ensure" in info.value.message


async def test_unknown_route_wrong_method_missing_job(api: Api) -> None:
    await api.error("GET", "/v2/anything", 404, "not_found")
    await api.error("GET", "/v1/nope", 404, "not_found")
    resp = await api.client.get("/v1/ensure")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"
    err = (await resp.json())["error"]
    assert err["code"] == "method_not_allowed" and err["details"]["allowed"] == ["POST"]
    await api.error("GET", "/v1/jobs/no-such-job", 404, "not_found")


async def test_overloaded_sets_retry_after(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise Overloaded("300 requests are already waiting", retry_after_s=2.2)

    monkeypatch.setattr(api.service, "ensure", refuse)
    for stream in (False, True):
        resp = await api.client.post("/v1/ensure", json={"ref": api.ref, "stream": stream})
        assert resp.status == 503 and resp.headers["Retry-After"] == "3"
        err = (await resp.json())["error"]
        assert err["code"] == "overloaded" and err["details"]["retry_after_s"] == 2.2


async def test_internal_error_keeps_the_traceback_in_the_log(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> dict[str, Any]:
        raise RuntimeError("secret internal state 0xdeadbeef")

    monkeypatch.setattr(api.service, "status", broken)
    with caplog.at_level(logging.ERROR, logger="weightcache.api.app"):
        resp = await api.client.get("/v1/status", headers={"X-Request-Id": "trace-me-1"})
        body = await resp.text()
    assert resp.status == 500 and resp.headers["X-Request-Id"] == "trace-me-1"
    doc = json.loads(body)
    assert doc["error"]["code"] == "internal" and doc["error"]["request_id"] == "trace-me-1"
    assert "Traceback" not in body and "0xdeadbeef" not in body and "RuntimeError" not in body
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "trace-me-1" in logged and "Traceback" in logged and "0xdeadbeef" in logged


async def test_request_ids_are_fresh_unless_given(api: Api) -> None:
    ids = set()
    for _ in range(3):
        resp = await api.client.get("/healthz")
        ids.add(resp.headers["X-Request-Id"])
    assert len(ids) == 3
    resp = await api.client.get("/healthz", headers={"X-Request-Id": "worker-7.req-42"})
    assert resp.headers["X-Request-Id"] == "worker-7.req-42"
    resp = await api.client.get("/healthz", headers={"X-Request-Id": "bad id\twith junk" * 10})
    assert resp.headers["X-Request-Id"] != "bad id\twith junk" * 10


async def test_overlong_header_is_a_clean_4xx_and_the_server_lives_on(api: Api) -> None:
    resp = await api.client.get("/healthz", headers={"X-Junk": "x" * 100_000})
    assert 400 <= resp.status < 500
    await resp.release()
    await api.json("GET", "/healthz", 200)


# -- auth --------------------------------------------------------------------------------


async def test_tcp_app_requires_the_token_on_v1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(tmp_path, tcp=True, WEIGHTCACHE_TOKEN=TOKEN) as api:
        err = await api.error("GET", "/v1/status", 401, "unauthorized")
        assert "hint" in err
        resp = await api.client.get("/v1/status")
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        for header in (
            "Bearer wrong",
            f"Basic {TOKEN}",
            TOKEN,
            "Bearer ",
            "Bearer tökén",  # non-ASCII must be a 401, not a 500
        ):
            await api.error(
                "GET", "/v1/status", 401, "unauthorized", headers={"Authorization": header}
            )
        await api.error("POST", "/v1/ensure", 401, "unauthorized", json={"ref": api.ref})
        await api.error("GET", f"/v1/blobs/{'0' * 64}", 401, "unauthorized")

        good = {"Authorization": f"Bearer {TOKEN}"}
        await api.json("GET", "/v1/status", 200, headers=good)
        await api.json("GET", "/v1/jobs", 200, headers={"Authorization": f"bearer {TOKEN}"})
        await api.json("POST", "/v1/ensure", 200, json={"ref": api.ref}, headers=good)
        for path in ("/healthz", "/metrics", "/v1/openapi.json"):
            resp = await api.client.get(path)
            assert resp.status == 200, path
            await resp.release()
    assert TOKEN not in caplog.text


async def test_unix_app_needs_no_token(tmp_path: Path) -> None:
    async with serving(tmp_path, tcp=False, WEIGHTCACHE_TOKEN=TOKEN) as api:
        await api.json("GET", "/v1/status", 200)


async def test_tcp_app_without_a_token_is_open(tmp_path: Path) -> None:
    async with serving(tmp_path, tcp=True) as api:
        await api.json("GET", "/v1/status", 200)


# -- the Unix socket ------------------------------------------------------------------


async def test_unix_socket_lease_belongs_to_the_peer_pid(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", 1 * MB, 4)
    cfg = config(tmp_path)
    service = Service(cfg)
    await service.start()
    runner = web.AppRunner(make_app(service, cfg, tcp=False))
    await runner.setup()
    path = str(tmp_path / "d.sock")
    try:
        await web.UnixSite(runner, path).start()
        async with (
            aiohttp.UnixConnector(path=path) as conn,
            aiohttp.ClientSession(connector=conn, connector_owner=False) as session,
            session.post("http://daemon/v1/ensure", json={"ref": ref}) as resp,
        ):
            doc = await resp.json()
        assert resp.status == 200, doc
        assert doc["lease"]["pid"] == os.getpid()
    finally:
        await runner.cleanup()
        await service.close()


# -- request bodies, as pure functions -------------------------------------------------


def test_parse_time_forms() -> None:
    z = datetime(2026, 11, 23, 12, tzinfo=UTC).timestamp()
    assert bodies.parse_time("2026-11-23T12:00:00Z", "at") == z
    assert bodies.parse_time("2026-11-23T14:00:00+02:00", "at") == z
    assert bodies.parse_time("2026-11-23 12:00:00.000Z", "at") == z
    assert bodies.parse_time(z, "at") == z
    assert bodies.parse_time(int(z), "at") == z
    assert bodies.parse_time(None, "at") is None
    bad: object
    for bad in ("2026-11-23T12:00:00", "tomorrow", "", True, -1, float("inf"), [1], {}):
        with pytest.raises(RequestInvalid) as info:
            bodies.parse_time(bad, "deadline")
        assert info.value.facts["field"] == "deadline"


def test_parse_bodies_defaults_and_refusals() -> None:
    assert bodies.parse_ensure({"ref": "m"}) == bodies.EnsureBody("m", False, True, Priority.WORKER)
    assert bodies.parse_prefetch({"ref": "m"}).priority is Priority.ADMIN
    assert bodies.parse_ensure({"ref": "m", "priority": "BACKGROUND"}).priority is (
        Priority.BACKGROUND
    )
    assert bodies.parse_evict({"ref": "m", "force": True}).force is True
    bodies.parse_empty({})
    for doc, field in (
        ({"ref": "m", "x": 1, "y": 2}, "x"),
        ({"ref": ""}, "ref"),
        ({"ref": None}, "ref"),
        ({"ref": "m", "lease": None}, "lease"),
        ({"ref": "m", "priority": 0}, "priority"),
    ):
        with pytest.raises(RequestInvalid) as info:
            bodies.parse_ensure(doc)
        assert info.value.facts["field"] == field
    for raw in (b"", b"  ", b"null", b"1", b'"s"', b"\xff\xfe", b"{"):
        with pytest.raises(RequestInvalid):
            bodies.decode(raw)
    assert bodies.decode(b"", allow_empty=True) == {}


def test_metrics_render_tolerates_a_sparse_snapshot() -> None:
    text = metrics.render({}).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "weightcache_hits" in names and "weightcache_disk_free_bytes" in names
