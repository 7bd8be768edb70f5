"""schemathesis against ``/v1/openapi.json``: the daemon answers what its document promises.

The document the app serves drives the generation: valid requests (positive) and
requests that break the documented schemas (negative), for every operation. The
app runs in this process behind the daemon's own listeners on a real TCP port
(aiohttp is neither ASGI nor WSGI), with the bearer token the document declares.

Checks: no 5xx (``not_a_server_error``), and the response conforms: its status
code is documented for the operation, its content type is one documented for
that status, and its body validates against the documented schema.

Examples per operation are bounded (``EXAMPLES``) so that the whole run stays
near half a minute on a small machine; the numbers of the last run are in
docs/reliability.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.faults.test_hostile_api import TOKEN, Served, collect_before_report, make_model
from weightcache.api import openapi

#: generated cases per operation and mode (positive, negative)
EXAMPLES = 100
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

schema = schemathesis.openapi.from_dict(
    openapi.document(),
    config=schemathesis.Config.from_dict(
        {"generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": False}}
    ),
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("openapi")
    ref = make_model(root, "m", 100_000, 3)
    with Served(root, {"WEIGHTCACHE_TOKEN": TOKEN}) as s:
        # Something to find: a cached model, a lease, a job, blobs to serve.
        assert s.post("/v1/ensure", {"ref": ref}, tcp=True).status == 200
        assert s.post("/v1/prefetch", {"ref": ref, "at": 4102444800}, tcp=True).status == 202
        yield s


@collect_before_report
@schema.parametrize()
@settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_every_operation_answers_as_documented(case: schemathesis.Case, served: Served) -> None:
    case.call_and_validate(
        base_url=f"http://127.0.0.1:{served.port}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=CHECKS,
        timeout=30,
    )
    failed = served.records.take_failures()
    assert not failed, failed[-1]


def _documented(doc: dict[str, Any], method: str, path: str) -> set[int]:
    return {int(code) for code in doc["paths"][path][method]["responses"]}


@collect_before_report
def test_errors_the_service_raises_are_documented(tmp_path: Path) -> None:
    """Statuses the fuzzer cannot reach with random text, checked one by one."""
    doc = openapi.document()
    ref = make_model(tmp_path, "m", 100_000, 4)
    bad = tmp_path / "origin" / "bad-manifest"
    bad.mkdir(parents=True)
    (bad / "weightcache.manifest.json").write_text(json.dumps({"format": "nonsense"}))
    undocumented = []
    with Served(tmp_path, {"WEIGHTCACHE_TOKEN": TOKEN}) as s:
        huge = b" " * (s.cfg.daemon.max_body_bytes + 1)
        cases: list[tuple[str, str, bytes]] = [
            # A manifest that does not validate: manifest_invalid.
            ("post", "/v1/ensure", json.dumps({"ref": f"file://{bad}"}).encode()),
            ("post", "/v1/prefetch", json.dumps({"ref": ref, "at": 10, "deadline": 10}).encode()),
            ("delete", "/v1/models", json.dumps({"ref": f"file://{bad}"}).encode()),
            # A body over the limit on every route that reads one: payload_too_large.
            ("post", "/v1/ensure", huge),
            ("post", "/v1/prefetch", huge),
            ("delete", "/v1/models", huge),
            ("post", "/v1/leases/{id}/release", huge),
            # A body on a route that takes none: request_invalid.
            ("post", "/v1/leases/{id}/release", b'{"why": "done"}'),
        ]
        for method, path, body in cases:
            reply = s.call(method.upper(), path.replace("{id}", "x"), body, tcp=True)
            assert reply.status < 500 or reply.status == 503, reply.body[:300]
            if reply.status not in _documented(doc, method, path):
                code = json.loads(reply.body)["error"]["code"]
                undocumented.append(f"{method.upper()} {path} -> {reply.status} {code}")
    assert not undocumented, undocumented
