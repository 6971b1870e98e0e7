"""HTTP handlers. Each module lists its routes in ``default_handlers``."""

from __future__ import annotations

from tornado import web

from . import info, metrics, transfers

default_handlers: list[tuple[str, type[web.RequestHandler]]] = [
    *info.default_handlers,
    *transfers.default_handlers,
    *metrics.default_handlers,
]
