"""What importing weightcache and its client loads, checked in fresh interpreters.

A worker imports ``weightcache`` (or ``weightcache.client``) to call ``load``:
that must not bring in the daemon's server (``aiohttp.web``, ``uvloop``), the
pull machinery (``minio``, ``diskcache``, ``weightcache.node``,
``weightcache.fetch``) or ``torch`` until a call needs them. Each check runs
in a new interpreter, since this test process has long since imported all of
them; and the client must import as ``weightcache.client`` from a plain
checkout (the ``weightcache/client`` symlink), not only from an install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: what a worker's ``import`` must not load
HEAVY = (
    "aiohttp.web",
    "uvloop",
    "minio",
    "diskcache",
    "torch",
    "weightcache.node",
    "weightcache.fetch",
)


def run_python(probe: str, cwd: Path) -> str:
    """``probe`` in a new interpreter (no PYTHON* variables, no user site); its last line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run(
        [sys.executable, "-s", "-c", probe],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def loaded_by(statement: str) -> set[str]:
    """The modules in ``sys.modules`` after ``statement`` in a fresh interpreter."""
    probe = f"import json, sys\n{statement}\nprint(json.dumps(list(sys.modules)))"
    return set(json.loads(run_python(probe, ROOT)))


@pytest.mark.parametrize(
    "statement",
    [
        "import weightcache",
        "from weightcache import load, load_with_report, open, snapshot",
        "import weightcache.client",
        "from weightcache.client.daemon import DaemonClient",
        "from weightcache.client.loader import load",
    ],
)
def test_a_workers_import_loads_nothing_heavy(statement: str) -> None:
    loaded = loaded_by(statement)
    assert "weightcache" in loaded, "the probe did not run the import"
    heavy = sorted(m for m in HEAVY if m in loaded)
    assert not heavy, f"`{statement}` loads {heavy}"


@pytest.mark.parametrize(
    ("statement", "heavy"),
    [
        ("import weightcache.api", "aiohttp.web"),
        ("import weightcache.service", "diskcache"),
    ],
)
def test_the_probe_sees_heavy_imports_where_there_are_some(statement: str, heavy: str) -> None:
    # The check above would pass on a probe that saw nothing: show it sees.
    assert heavy in loaded_by(statement)


def test_the_client_imports_as_weightcache_client_from_a_plain_checkout(tmp_path: Path) -> None:
    # What a checkout holds without `pip install`: the package, client/ beside it, and
    # the weightcache/client symlink between them.
    for name in ("weightcache", "client"):
        shutil.copytree(
            ROOT / name,
            tmp_path / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    assert (tmp_path / "weightcache" / "client").is_symlink()
    probe = (
        "import json, weightcache, weightcache.client, weightcache.client.daemon as d, "
        "weightcache.client.loader as l; "
        "print(json.dumps([weightcache.__file__, d.__file__, l.__file__]))"
    )
    files = [Path(p).resolve() for p in json.loads(run_python(probe, tmp_path))]
    # From the checkout itself (the working directory), not from this environment's
    # install of the package.
    assert files == [
        tmp_path / "weightcache" / "__init__.py",
        tmp_path / "client" / "daemon.py",
        tmp_path / "client" / "loader.py",
    ]


def test_the_demo_gets_as_far_as_naming_its_extra_without_it() -> None:
    # `weightcache demo` on a plain install imports the demo and checks for what the
    # `demo` extra brings: none of that may be needed to get there.
    probe = (
        "import json, sys, weightcache.demo.run, weightcache.demo.seaweed; "
        "weightcache.demo.missing(); "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'safetensors', 'numpy'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(out.stdout) == []


def test_demo_fixtures_live_in_the_demo_subpackage() -> None:
    # The product package holds the product: the demo and its fixtures are
    # weightcache.demo (behind the `demo` extra), the report writer is loadtest's.
    package = ROOT / "weightcache"
    for gone in ("seaweed.py", "synthetic.py", "demo.py", "docsection.py"):
        assert not (package / gone).exists(), gone
    for module in ("run", "processes", "tensors", "seaweed", "synthetic"):
        assert (package / "demo" / f"{module}.py").is_file(), module


def test_every_package_of_the_tree_is_in_the_wheel() -> None:
    # A package missing from [tool.setuptools] packages works in a checkout and an
    # editable install, and is simply absent from a wheel.
    import tomllib

    root = Path(__file__).resolve().parents[2]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(root).parts)
        for p in (root / "weightcache").rglob("__init__.py")
        if "__pycache__" not in p.parts
        and "client" not in p.relative_to(root / "weightcache").parts[:-1]
    }
    assert found <= listed | {"weightcache.client"}, sorted(found - listed)
