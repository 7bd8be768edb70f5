"""The monitoring files under deploy/: alert rules, their PrometheusRule, the Grafana dashboard.

The rules pass ``promtool check rules`` and their unit tests on synthetic series
(``promtool test rules``: each alert fires where it should and not where it
should not); the PrometheusRule carries exactly the rule file's groups; the
dashboard's queries parse as PromQL (through promtool) and filter on its
``$instance`` variable. Every metric name the rules and the dashboard use is one
a live daemon exports: an in-process app over a ``file://`` origin, with one
peer that refuses connections, scraped after an ensure, a hit, a failed ensure
and two prefetches, so that the labelled families (the per-peer ones included)
have series. promtool comes from ``make install`` (Debian's
``prometheus`` package, unpacked into ``.venv/bin``); without it these tests
fail, they do not skip.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.support.published import cache_config, publish_model
from weightcache.api import make_app
from weightcache.service import Service

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "weightcache-rules.yaml"
RULES_TEST = PROMETHEUS / "weightcache-rules.test.yaml"
PROMETHEUS_RULE = PROMETHEUS / "weightcache-prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "weightcache-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

#: series Prometheus makes itself, not the daemon: allowed in the rules only
PROMETHEUS_SERIES = {"up"}
#: labels a scrape adds (``node``: the PodMonitor's relabeling); every other label
#: a query names must be one the daemon exports on that metric
TARGET_LABELS = {"instance", "job", "node"}
#: what the dashboard must show, by metric
DASHBOARD_MUST_SHOW = {
    "weightcache_hits_total",
    "weightcache_misses_total",
    "weightcache_coalesced_total",
    "weightcache_origin_bytes_total",
    "weightcache_served_bytes_total",
    "weightcache_peer_bytes_served_total",
    "weightcache_pulls_in_flight",
    "weightcache_disk_used_bytes",
    "weightcache_disk_budget_bytes",
    "weightcache_errors_total",
    "weightcache_leases",
    "weightcache_jobs",
}
#: the monitoring.coreos.com/v1 PrometheusRule CRD's fields
RULE_GROUP_FIELDS = {
    "name",
    "interval",
    "rules",
    "limit",
    "partial_response_strategy",
    "query_offset",
    "labels",
}
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
CRD_DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
SEVERITIES = {"critical", "warning", "info"}


# -- promtool ---------------------------------------------------------------------------


def _promtool() -> str:
    venv = Path(sys.executable).with_name("promtool")
    if venv.is_file():
        return str(venv)
    found = shutil.which("promtool")
    if found:
        return found
    pytest.fail(
        "promtool not found (neither in .venv/bin nor on PATH): run `make install`, which "
        "unpacks it from Debian's prometheus package"
    )


def _run_promtool(*args: str) -> str:
    out = subprocess.run(
        [_promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"
    return out.stdout + out.stderr


# -- PromQL -----------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_LABEL_LIST = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.$])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "atan2", "inf", "nan",
    # aggregation operators (followed by `by (...)` as often as by `(`)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
#: Grafana's variables, as a query would have them substituted
_GRAFANA_RANGE = re.compile(r"\$\{?__(?:rate_interval|interval|range)\b\}?")
_GRAFANA_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")


@dataclass(frozen=True)
class Query:
    """What a PromQL expression names: metrics, and labels by metric."""

    metrics: frozenset[str]
    #: (metric, label) for every label matcher in a selector
    matched: frozenset[tuple[str, str]]
    #: labels in by/without/on/ignoring/group_* lists
    grouped: frozenset[str]


def parse_query(expr: str) -> Query:
    """Metric and label names in ``expr``; strings, durations, functions, keywords left out."""
    matched = set()
    metrics = set()
    for name, body in _SELECTOR.findall(_STRING.sub('""', expr)):
        if name.lower() in _KEYWORDS:
            name = ""  # `and {...}`: a selector with no name in front
        for label in _MATCHER.findall(body):
            if label != "__name__":
                matched.add((name, label))
    for _, body in _SELECTOR.findall(expr):
        # {__name__="x"} names a metric without writing it in front
        named = re.search(r'__name__\s*=\s*"([^"]+)"', body)
        if named:
            metrics.add(named.group(1))
    grouped = {
        label.strip()
        for _, labels in _LABEL_LIST.findall(expr)
        for label in labels.split(",")
        if label.strip()
    }
    bare = _STRING.sub('""', expr)
    bare = re.sub(r"\{[^{}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\[\]]*\]", "", bare)  # ranges and subqueries
    bare = _LABEL_LIST.sub(r"\1", bare)  # grouping label lists
    for match in _IDENTIFIER.finditer(bare):
        word = match.group(0)
        rest = bare[match.end() :].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):
            continue  # a keyword or a function call
        metrics.add(word)
    return Query(frozenset(metrics), frozenset(matched), frozenset(grouped))


def substitute_grafana(expr: str) -> str:
    """The query as Grafana sends it, near enough: ranges become 5m, variables match all."""
    return _GRAFANA_VARIABLE.sub(".*", _GRAFANA_RANGE.sub("5m", expr))


def test_parse_query_finds_metrics_and_labels_only() -> None:
    q = parse_query(
        'sum by (instance, code) (increase(weightcache_errors_total{code=~"a|b", job!="x"}[10m]))'
        " > 0 or histogram_quantile(0.9, rate(x_seconds_bucket[5m] offset 1h))"
        ' unless on (instance) up == bool 1 and {__name__="y_total", code="c"}'
    )
    assert q.metrics == {"weightcache_errors_total", "x_seconds_bucket", "up", "y_total"}
    assert q.matched == {
        ("weightcache_errors_total", "code"),
        ("weightcache_errors_total", "job"),
        ("", "code"),
    }
    assert q.grouped == {"instance", "code"}
    grafana = 'sum(rate(a_total{instance=~"$instance"}[$__rate_interval])) / ${x}'
    assert substitute_grafana(grafana) == 'sum(rate(a_total{instance=~".*"}[5m])) / .*'


# -- what a live daemon exports --------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    #: sample names: ``<family>_total`` for counters, ``_bucket``/``_sum``/``_count`` for
    #: histograms, also for families that have no series yet
    names: frozenset[str]
    #: sample name -> labels its series carry (families with series only)
    labels: dict[str, frozenset[str]]


_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
}


@pytest.fixture
def dead_peer() -> Iterator[str]:
    """The URL of a peer that refuses every connection: a port bound but never listened on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
async def exported(tmp_path: Path, dead_peer: str) -> Exported:
    """A real daemon app's /metrics after a miss, a hit, a failed ensure, a job, a schedule.

    With one peer, which refuses: the chunks it owns come from the origin after one
    failed try, and the per-peer families have series.
    """
    model = publish_model(tmp_path, "m", 300_000, seed=1)
    cfg = cache_config(
        tmp_path, WEIGHTCACHE_PEERS_URLS=dead_peer, WEIGHTCACHE_DAEMON_LISTEN="127.0.0.1:0"
    )
    service = Service(cfg)
    await service.start()
    try:
        async with TestClient(TestServer(make_app(service, cfg, tcp=False))) as client:
            for path, body, status in (
                ("/v1/ensure", {"ref": model.ref}, 200),  # a miss, and a lease
                ("/v1/ensure", {"ref": model.ref, "lease": False}, 200),  # a hit
                ("/v1/ensure", {"ref": f"file://{tmp_path}/origin/absent"}, 404),  # an error
                ("/v1/prefetch", {"ref": model.ref, "at": 4102444800}, 202),  # a job
                ("/v1/prefetch", {"ref": model.ref, "schedule": "0 9 * * *"}, 201),
            ):
                resp = await client.post(path, json=body)
                assert resp.status == status, await resp.text()
            resp = await client.get("/metrics")
            assert resp.status == 200
            text = await resp.text()
    finally:
        await service.close()

    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    # The scenario did what it is for: the labelled families have series.
    for name, label in (
        ("weightcache_errors_total", "code"),
        ("weightcache_jobs", "state"),
        ("weightcache_prefetch_jobs_total", "outcome"),
        ("weightcache_schedule_window_misses_total", "schedule"),
        ("weightcache_peer_up", "peer"),
        ("weightcache_peer_failures_total", "reason"),
    ):
        assert label in labels.get(name, set()), f"no {name}{{{label}}} series in:\n{text}"
    return Exported(frozenset(names), {k: frozenset(v) for k, v in labels.items()})


def _unknown(queries: dict[str, Query], exported: Exported, allowed: set[str]) -> list[str]:
    """'where: problem' for every metric or label the daemon does not export."""
    problems = []
    for where, q in queries.items():
        for name in sorted(q.metrics - exported.names - allowed):
            problems.append(f"{where}: metric {name} is not exported")
        for name, label in sorted(q.matched):
            if label in TARGET_LABELS or name in allowed or name not in exported.labels:
                continue  # a target label, Prometheus' own series, or no series to know by
            if label not in exported.labels[name]:
                problems.append(f"{where}: {name} has no label {label!r}")
        known = set().union(*(exported.labels.get(m, frozenset()) for m in q.metrics))
        for label in sorted(q.grouped - TARGET_LABELS - known):
            if q.metrics & allowed:
                continue
            problems.append(f"{where}: groups by {label!r}, which none of its metrics has")
    return problems


def test_the_name_check_reports_what_is_not_exported() -> None:
    exported = Exported(frozenset({"a_total", "b"}), {"a_total": frozenset({"code"})})
    queries = {"q": parse_query('sum by (state) (rate(a_total{code="x", kind="y"}[5m])) / c')}
    assert _unknown(queries, exported, set()) == [
        "q: metric c is not exported",
        "q: a_total has no label 'kind'",
        "q: groups by 'state', which none of its metrics has",
    ]


# -- alert rules ------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_rules_pass_promtool_check() -> None:
    out = _run_promtool("check", "rules", str(RULES))
    assert f"SUCCESS: {len(_rules())} rules found" in out, out


def test_rules_unit_tests_pass() -> None:
    out = _run_promtool("test", "rules", str(RULES_TEST))
    assert "SUCCESS" in out, out


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())
    assert tests["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert alerts - firing == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"
    assert (firing | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_every_alert_has_a_severity_and_a_summary() -> None:
    for rule in _rules():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


async def test_rules_use_only_metrics_the_daemon_exports(exported: Exported) -> None:
    queries = {rule["alert"]: parse_query(rule["expr"]) for rule in _rules()}
    used = set().union(*(q.metrics for q in queries.values()))
    assert {"up", "weightcache_errors_total", "weightcache_disk_free_bytes"} <= used, used
    problems = _unknown(queries, exported, PROMETHEUS_SERIES)
    assert not problems, "\n".join(problems)


def test_prometheusrule_has_the_rule_files_groups() -> None:
    (doc,) = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d]
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert doc["metadata"]["name"] == "weightcache"
    assert doc["metadata"]["namespace"] == "weightcache"  # the kustomization's namespace
    assert set(doc["spec"]) == {"groups"}
    groups = doc["spec"]["groups"]
    plain = yaml.safe_load(RULES.read_text())
    assert set(plain) == {"groups"}
    for mine, theirs in zip(groups, plain["groups"], strict=False):
        for a, b in zip(mine["rules"], theirs["rules"], strict=False):
            assert a == b, f"{PROMETHEUS_RULE.name} and {RULES.name} differ in {b.get('alert')}"
    assert groups == plain["groups"], f"edit {PROMETHEUS_RULE.name} and {RULES.name} together"
    for group in groups:
        assert set(group) <= RULE_GROUP_FIELDS, group["name"]
        for rule in group["rules"]:
            assert set(rule) <= RULE_FIELDS, rule
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str), rule
            for key in ("for", "keep_firing_for"):
                assert CRD_DURATION.match(str(rule.get(key, "0"))), (rule, key)
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(key, {}).values()), (rule, key)


# -- the dashboard ----------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold theirs


def _dashboard_queries() -> dict[str, str]:
    """'panel title / refId' -> its PromQL; the variables' queries too."""
    out = {}
    for panel in _panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            out[f"{panel['title']} / {target['refId']}"] = target["expr"]
    for var in _dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query.strip())
            assert found, f"variable {var['name']}: {query}"
            out[f"variable {var['name']}"] = f"{found.group(1)}"
    return out


def test_dashboard_parses_and_has_an_instance_variable() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["multi"] and instance["includeAll"]
    assert instance["allValue"] == ".*"
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in _panels(dash["panels"]):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_filter_on_the_instance_variable() -> None:
    for where, expr in _dashboard_queries().items():
        if where.startswith("variable "):
            continue
        selectors = _SELECTOR.findall(expr)
        assert selectors, f"{where}: no selector in {expr}"
        for name, body in selectors:
            assert 'instance=~"$instance"' in body, f"{where}: {name} is not filtered on $instance"


def test_dashboard_queries_are_promql(tmp_path: Path) -> None:
    """promtool parses each query, Grafana's variables substituted, as a recording rule."""
    rules = [
        {"record": f"weightcache_dashboard:query_{i}", "expr": substitute_grafana(expr)}
        for i, expr in enumerate(_dashboard_queries().values())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = _run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in out, out


async def test_dashboard_uses_only_metrics_the_daemon_exports(exported: Exported) -> None:
    queries = {where: parse_query(expr) for where, expr in _dashboard_queries().items()}
    problems = _unknown(queries, exported, set())
    assert not problems, "\n".join(problems)
    used = set().union(*(q.metrics for q in queries.values()))
    assert DASHBOARD_MUST_SHOW - used == set(), "the dashboard leaves these out"


# -- the docs ---------------------------------------------------------------------------


def test_operations_md_points_at_the_files_and_names_every_alert() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    for path in (RULES, RULES_TEST, PROMETHEUS_RULE, DASHBOARD):
        assert f"](../{path.relative_to(ROOT)})" in text, f"operations.md does not link {path}"
    # One source of truth: no rule file inline.
    assert not re.search(r"^\s*- alert:", text, re.M), "alert rules inline in operations.md"
    alerts = {rule["alert"] for rule in _rules()}
    named = set(re.findall(r"`(Weightcache[A-Za-z]+)`", text))
    assert alerts - named == set(), "alerts operations.md does not describe"
    assert named - alerts == set(), "operations.md describes alerts that do not exist"
