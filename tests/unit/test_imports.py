"""Importing weightcache for `load` stays light: no server, no pull machinery until used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import weightcache
from weightcache.client import loader
before = set(sys.modules)
print(json.dumps(sorted(m for m in before if m.split('.')[0] in
      ('aiohttp', 'uvloop', 'minio', 'diskcache', 'urllib3', 'torch', 'weightcache'))))
"""


def test_import_is_light() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, check=True
    )
    loaded = set(json.loads(out.stdout))
    for heavy in (
        "aiohttp.web",
        "uvloop",
        "minio",
        "diskcache",
        "weightcache.node",
        "weightcache.fetch",
    ):
        assert heavy not in loaded, f"{heavy} imported by `import weightcache`"
    assert "torch" not in loaded  # the loader imports torch on first call only
    assert "weightcache.client.loader" in loaded


def test_client_maps_to_the_client_directory() -> None:
    import weightcache.client.loader as loader

    assert Path(loader.__file__).resolve() == ROOT / "client" / "loader.py"


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
