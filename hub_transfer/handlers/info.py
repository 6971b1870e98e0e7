"""The service's own pages: what it is (for hub users) and whether it lives."""

from __future__ import annotations

from tornado import web

from .._version import __version__
from ..errors import ServiceError
from .base import APIHandler
from .transfers import TransfersHandler


class ServiceRootHandler(TransfersHandler):
    """``GET {prefix}`` describes the service; ``POST {prefix}`` submits.

    POST at the bare prefix is the URL the reference service used, so
    existing ``GLOBUS_TRANSFER_SUBMISSION_URL`` settings keep working.
    """

    async def get(self) -> None:
        user = self.current_user
        if not user:
            # a browser without a session goes through the hub's OAuth login;
            # a client that sent a token gets a JSON 401/403 instead of a page.
            # The hub's own start-up probe lands here and gets a redirect.
            if self.request.headers.get("Authorization") or self._hub_user_refused:
                self.require_hub_user()
            self.redirect(self.get_login_url())
            return
        self.write_json(
            {
                "service": "hub-transfer",
                "version": __version__,
                "user": user["name"],
                "submit_url": self.request.path,
                "description": "Submits Globus transfers for the Globus JupyterLab "
                "extension: POST the transfer document here with the user's "
                "server token.",
            }
        )


class HealthHandler(APIHandler):
    """Unauthenticated liveness for probes; touches neither the hub nor Globus."""

    quiet_access_log = True

    async def prepare(self) -> None:
        # no hub lookup: a probe must not depend on the hub being up
        self._hub_auth_user_cache = None

    def get(self) -> None:
        self.write_json({"status": "ok", "version": __version__})


class NotFoundHandler(APIHandler):
    """Any path we do not serve: a JSON 404, like every other error."""

    async def prepare(self) -> None:
        self._hub_auth_user_cache = None
        raise ServiceError(
            404, "not_found", f"No such endpoint: {self.request.path[:200]}"
        )


default_handlers: list[tuple[str, type[web.RequestHandler]]] = [
    ("", ServiceRootHandler),
    ("api/health", HealthHandler),
]
