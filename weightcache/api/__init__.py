"""The daemon's HTTP API (aiohttp): the only place the aiohttp server is imported.

:func:`make_app` builds the application for one listener; handlers are thin
shims over :class:`weightcache.service.Service`.
"""

from __future__ import annotations

from weightcache.api.app import make_app

__all__ = ["make_app"]
