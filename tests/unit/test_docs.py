"""The documentation names everything the code exposes, so the two cannot drift silently.

Every error code is described in docs/errors.md, every route of the daemon's
app and every metric family it exposes in docs/api.md, every CLI subcommand
and option in README.md or docs/, every config field in docs/operations.md,
and every relative link in the docs points at a file (and heading) that
exists. No network: the app and a status snapshot come from a Service over a
fresh cache directory that is never started.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import get_type_hints

import pytest
from aiohttp import web

from weightcache.api import make_app, metrics, openapi
from weightcache.cli import build_parser
from weightcache.config import Config, load_config
from weightcache.errors import ALL_ERRORS
from weightcache.service import Service

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
#: codes the API emits without an exception class of their own
API_ONLY_CODES = ("method_not_allowed", "internal")


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    svc = Service(load_config(env={"WEIGHTCACHE_CACHE_DIR": str(tmp_path / "cache")}))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()


# -- errors ---------------------------------------------------------------------------


def test_every_error_code_has_a_row_and_a_section() -> None:
    text = read("docs/errors.md")
    codes = sorted({cls.code for cls in ALL_ERRORS} | set(API_ONLY_CODES))
    for code in codes:
        assert re.search(rf"^\| `{code}` \|", text, re.M), f"{code}: no row in the summary table"
        assert re.search(rf"^### `{code}`", text, re.M), f"{code}: no section in docs/errors.md"
    for cls in ALL_ERRORS:
        pattern = rf"^\| `{cls.code}` \| `{cls.__name__}` \| (\d+) \| (yes|no) \|"
        row = re.search(pattern, text, re.M)
        assert row, f"{cls.code}: the row must name {cls.__name__}, its status and retryable"
        assert int(row.group(1)) == cls.http_status, f"{cls.code}: documented status is wrong"
        assert (row.group(2) == "yes") == cls.retryable, f"{cls.code}: retryable is wrong"


# -- routes ---------------------------------------------------------------------------


def _routes(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert isinstance(path, str), route
        out.add((route.method.upper(), path))
    return out


async def test_every_route_has_a_section_in_api_md(service: Service) -> None:
    text = read("docs/api.md")
    routed = _routes(make_app(service, service.cfg, tcp=True))
    documented = {
        (method.upper(), path)
        for path, item in openapi.document()["paths"].items()
        for method in item
        if method in ("get", "post", "delete", "put", "patch", "head")
    }
    assert routed, "the app has no routes"
    for method, path in sorted(routed | documented):
        assert f"`{method} {path}`" in text, f"{method} {path} is not in docs/api.md"
        assert re.search(rf"^### `{re.escape(f'{method} {path}')}`", text, re.M), (
            f"{method} {path} has no section of its own in docs/api.md"
        )


# -- metrics --------------------------------------------------------------------------


async def test_every_metric_family_is_documented_with_its_type_and_help(service: Service) -> None:
    text = read("docs/api.md")
    exposition = metrics.render(await service.status()).decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", exposition, re.M))
    assert "weightcache_hits_total" in types and "weightcache_jobs" in types
    for name, kind in sorted(types.items()):
        # `name` or `name{label}`, its type, its help text.
        pattern = rf"^\| `{re.escape(name)}(?:\{{[a-z_,]+\}})?` \| (\w+) \| (.*) \|$"
        row = re.search(pattern, text, re.M)
        assert row, f"metric {name} has no row in docs/api.md"
        assert row.group(1) == kind, f"{name}: documented as {row.group(1)}, exposed as {kind}"
        assert row.group(2).strip() == helps[name], f"{name}: help text differs"
    # The alert rules and tables in operations.md name only metrics that exist.
    for name in re.findall(r"\bweightcache_[a-z_]+", read("docs/operations.md")):
        assert name in types, f"docs/operations.md uses {name}, which the daemon does not expose"


# -- CLI ------------------------------------------------------------------------------


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_cli_subcommand_is_in_the_readme_or_operations() -> None:
    text = read("README.md") + read("docs/operations.md")
    commands = _subcommands()
    assert {"daemon", "prefetch", "status", "evict", "verify", "jobs"} <= commands.keys()
    for name in commands:
        assert re.search(rf"weightcache {name}\b|`{name}[ `]", text), (
            f"subcommand {name!r} is in neither README.md nor docs/operations.md"
        )


def test_every_cli_option_is_documented() -> None:
    text = read("README.md") + "".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    options = {
        opt
        for sub in [build_parser(), *_subcommands().values()]
        for action in sub._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }
    for opt in sorted(options):
        assert re.search(rf"{re.escape(opt)}\b", text), f"option {opt} is documented nowhere"


# -- config ---------------------------------------------------------------------------


def test_every_config_field_is_in_operations_with_its_variable() -> None:
    text = read("docs/operations.md")
    sections = get_type_hints(Config)
    for section in dataclasses.fields(Config):
        assert f"### `[{section.name}]`" in text, f"section [{section.name}] has no heading"
        for field in dataclasses.fields(sections[section.name]):
            dotted = f"{section.name}.{field.name}"
            row = re.search(rf"^\| `{re.escape(dotted)}` \|(.*)$", text, re.M)
            assert row, f"{dotted} has no row in docs/operations.md"
            var = f"WEIGHTCACHE_{section.name}_{field.name}".upper()
            assert var in row.group(1), f"{dotted}: the row does not name {var}"


# -- links ----------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"^#{1,6} (.+)$", line)
        if m and not in_code:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize(
    "doc", ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))], ids=str
)
def test_relative_links_resolve(doc: str) -> None:
    source = ROOT / doc
    text = re.sub(r"```.*?```", "", source.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        assert resolved.exists(), f"{doc}: link to {target} points at nothing"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{doc}: no heading for #{anchor} in {path or doc}"


# -- test references ------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
)
def test_every_test_a_doc_names_exists(doc: str) -> None:
    # `tests/x/test_y.py::test_z` names a file and a test; a following `::test_w`
    # names another test of the last file named.
    text = read(doc)
    last: Path | None = None
    pattern = r"`((?:tests/)?(?:unit|integration|faults|gpu)/[\w/]+\.py)?(?:::(\w+))?`"
    for match in re.finditer(pattern, text):
        path, name = match.group(1), match.group(2)
        if path:
            last = ROOT / (path if path.startswith("tests/") else f"tests/{path}")
            assert last.is_file(), f"{doc} names {path}, which does not exist"
        if name:
            assert last is not None, f"{doc} names ::{name} before any test file"
            assert re.search(rf"^(async )?def {name}\(", last.read_text(), re.M), (
                f"{doc} names {last.relative_to(ROOT)}::{name}, which does not exist"
            )
