"""What every handler shares: hub identity, JSON answers, one error shape."""

from __future__ import annotations

import asyncio
import json
import logging
import typing as t

from jupyterhub.services.auth import HubOAuth, HubOAuthenticated, UserNotAllowed
from tornado import web

from ..errors import ServiceError

log = logging.getLogger(__name__)


class BaseHandler(HubOAuthenticated, web.RequestHandler):
    """A handler that knows its hub user before any method runs.

    ``prepare`` resolves the caller through HubOAuth's async path and stores the
    result where ``HubAuthenticated.get_current_user`` looks first, so tornado's
    synchronous ``current_user`` never triggers a blocking hub request.
    """

    # set on subclasses whose successful requests should log at DEBUG
    quiet_access_log = False

    def initialize(self, hub_auth: HubOAuth, **_: t.Any) -> None:
        self.hub_auth = hub_auth
        self._hub_user_refused: dict[str, t.Any] | None = None
        self.log_outcome = ""
        # the application waits for these at shutdown
        in_flight = self.settings.get("in_flight")
        if in_flight is not None:
            in_flight.add(self)

    async def prepare(self) -> None:
        # the scheme the proxy was reached with, so HubOAuth marks its cookie
        # Secure behind https
        scheme = self.request.headers.get("X-Forwarded-Proto", "").split(",")[0]
        if scheme.strip() in ("http", "https"):
            self.request.protocol = scheme.strip()
        if self.request.method == "OPTIONS":
            self._hub_auth_user_cache = None
            return
        stopping = self.settings.get("stopping")
        if stopping is not None and stopping.is_set():
            self._hub_auth_user_cache = None
            raise ServiceError(
                503,
                "service_stopping",
                "The service is restarting; try again in a moment.",
                headers={"Retry-After": "5", "Connection": "close"},
            )
        await self.identify_hub_user()

    async def identify_hub_user(self) -> None:
        """Resolve the hub user (or service) behind this request, if any.

        Bounded in time: a hub that hangs must not hang the caller, whose own
        Jupyter server waits on us without a timeout.
        """
        self._hub_auth_user_cache = None
        timeout = self.settings.get("hub_timeout", 10.0)
        try:
            model = await asyncio.wait_for(
                self.hub_auth.get_user(self, sync=False), timeout
            )
        except TimeoutError:
            log.error("JupyterHub did not say who is calling within %ss", timeout)
            raise ServiceError(
                504,
                "hub_unavailable",
                "JupyterHub did not answer in time; try again shortly.",
            ) from None
        except web.HTTPError as exc:
            # HubAuth raises 5xx when the hub cannot be reached or fails
            log.error("Could not check the caller with the hub: %s", exc.log_message)
            raise ServiceError(
                502,
                "hub_unavailable",
                "JupyterHub could not be asked who is calling; try again shortly.",
            ) from None
        if not model:
            return
        try:
            self._hub_auth_user_cache = self.check_hub_user(model)
        except UserNotAllowed:
            self._hub_user_refused = model

    def get_current_user(self) -> dict[str, t.Any] | None:
        # never fall back to HubAuth's blocking lookup: prepare() decided
        return getattr(self, "_hub_auth_user_cache", None)

    @property
    def hub_user_name(self) -> str:
        user = getattr(self, "_hub_auth_user_cache", None) or self._hub_user_refused
        return user["name"] if user else ""

    def require_hub_user_not_service(self) -> dict[str, t.Any]:
        """The calling hub *user*: hub services hold no Globus identity of their
        own and would share a user's area in ACL mode if named like one."""
        user = self.require_hub_user()
        if user.get("kind", "user") != "user":
            raise ServiceError(
                403,
                "users_only",
                "Only hub users submit transfers; a hub service may not.",
            )
        return user

    def require_hub_user(self) -> dict[str, t.Any]:
        """The allowed hub user, or a 401/403 telling the caller why not."""
        user = self.current_user
        if user:
            return user
        if self._hub_user_refused:
            model = self._hub_user_refused
            raise ServiceError(
                403,
                "hub_access_denied",
                f"Hub {model.get('kind', 'user')} {model['name']!r} is not allowed "
                "to use this service: its token lacks the "
                f"{' or '.join(sorted(self.hub_auth.access_scopes))} scope.",
            )
        raise ServiceError(
            401,
            "hub_auth_required",
            "Send the single-user server's JupyterHub token as "
            "'Authorization: Bearer <token>'; none was given, or the hub does not "
            "know it.",
        )


class APIHandler(BaseHandler):
    """JSON in, JSON out, and every error as ``{status, error, message}``."""

    def set_default_headers(self) -> None:
        # no version banner for strangers
        self.clear_header("Server")
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

        # CORS only for the one origin an admin opened; none by default
        allowed = self.settings.get("allow_origin")
        if allowed and self.request.headers.get("Origin") == allowed:
            self.set_header("Access-Control-Allow-Origin", allowed)
            self.set_header(
                "Access-Control-Allow-Headers", "Authorization, Content-Type"
            )
            self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.set_header("Vary", "Origin")

    async def options(self, *args: t.Any) -> None:
        """CORS preflight: answered without auth, useful only for an opened origin."""
        self.set_status(204)
        self.finish()

    def check_xsrf_cookie(self) -> None:
        # HubOAuth checks XSRF itself for cookie-authenticated requests (and then
        # ignores the cookie); token-authenticated API calls need no XSRF token
        return self.hub_auth.check_xsrf_cookie(self)

    def page_arguments(self, default_limit: int = 50) -> tuple[int, int]:
        """``?limit=&offset=`` as bounded integers, or a 400 naming the bad one."""
        values = []
        for name, default, most in (("limit", default_limit, 500), ("offset", 0, None)):
            raw = self.get_query_argument(name, str(default))
            # isdigit() alone accepts '²'; and SQLite integers stop at 2**63
            if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
                raise ServiceError(
                    400,
                    "invalid_argument",
                    f"{name} must be a non-negative integer.",
                    field=name,
                )
            value = int(raw)
            values.append(min(value, most) if most else value)
        return values[0], values[1]

    def write_json(self, data: t.Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: t.Any) -> None:
        """Answer every failure with JSON, and log what an admin needs.

        A :class:`ServiceError` carries its own code and message. Tornado's own
        ``HTTPError`` keeps its status with a generic code. Anything else is a bug
        of ours: its traceback goes to the log, never to the client.
        """
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ServiceError):
            error = exc
        elif isinstance(exc, web.HTTPError):
            message = exc.log_message or self._reason
            if exc.log_message and exc.args:
                message = exc.log_message % exc.args
            error = ServiceError(status_code, _tornado_code(status_code), message)
        else:
            error = ServiceError(
                500,
                "internal_error",
                "The service failed unexpectedly; the admin can find the cause in "
                "its log.",
            )

        for name, value in error.headers.items():
            self.set_header(name, value)
        self.clear_header("Server")
        self.set_header("Content-Type", "application/json; charset=UTF-8")

        # the extension shows the user only a generic error, so the request's one
        # access-log line (WARNING for 4xx, ERROR for 5xx) must say what happened
        details = [f"error={error.error}"] + [
            f"{key}={error.details[key]}"
            for key in ("globus_code", "request_id", "field")
            if key in error.details
        ]
        self.log_outcome = " ".join(details) + f" message={error.message!r}"
        self.finish(json.dumps(error.to_json()))

    def log_exception(self, typ: t.Any, value: t.Any, tb: t.Any) -> None:
        """Log a bug of ours with its traceback, but never the request itself.

        Tornado's default prints the full URI and the request's headers, which
        can carry a ``?token=`` or an ``Authorization`` header.
        """
        if isinstance(value, web.HTTPError):
            # expected failures are logged once, by the access line
            return
        log.error(
            "Unexpected error in %s %s (hub user %r)",
            self.request.method,
            self.request.path,
            self.hub_user_name,
            exc_info=(typ, value, tb),
        )


def _tornado_code(status: int) -> str:
    return {
        400: "bad_request",
        401: "hub_auth_required",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        413: "body_too_large",
        415: "unsupported_media_type",
    }.get(status, "http_error")
