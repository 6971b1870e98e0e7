"""The hub-transfer Application: options, logging, wiring, start and stop.

Everything configurable lives on this class or on the classes it lists; nothing
reads the environment at import time. ``initialize()`` builds the collaborators
once (hub auth, the Globus submitter) and hands them to each route explicitly,
so tests can hand in others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import typing as t
import weakref
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuth
from tornado import httpserver, web
from traitlets import (
    Bool,
    Bytes,
    Enum,
    Float,
    Instance,
    Integer,
    Unicode,
    default,
    validate,
)
from traitlets.config import Application, catch_config_error

from ._version import __version__
from .access import AccessManager, Reconciler
from .auth import OAuthCallbackHandler, ServiceHubAuth
from .errors import ServiceError
from .globus import TransferSubmitter
from .handlers import default_handlers
from .handlers.info import NotFoundHandler
from .limits import UserLimits
from .log import init_logging, log_request
from .metrics import Metrics
from .policy import AccessPolicy, IdentityBinding
from .store import CryptKeeper, CryptKeyError, Store
from .store.db import SchemaError

# Globus failures that say nothing about our configuration
TRANSIENT_ERRORS = frozenset(
    {
        "globus_timeout",
        "globus_unreachable",
        "globus_unavailable",
        "globus_rate_limited",
        "globus_failure",
    }
)


T = t.TypeVar("T")


class StartupError(Exception):
    """A setting is missing or wrong: the service cannot start."""


class HubTransferApp(Application):
    """Serve the transfer-submission API under the hub's service prefix."""

    name = "hub-transfer"
    version = __version__
    description = """Submit Globus transfers for the Globus JupyterLab extension,
    as a JupyterHub-managed service."""

    classes = [
        TransferSubmitter,
        AccessManager,
        AccessPolicy,
        IdentityBinding,
        UserLimits,
    ]

    aliases = {
        "config": "HubTransferApp.config_file",
        "log-level": "HubTransferApp.log_level",
        "bind-url": "HubTransferApp.bind_url",
    }
    flags = {
        "generate-config": (
            {"HubTransferApp": {"generate_config": True}},
            "Print a config file with every option and its help, then exit.",
        ),
        "debug": (
            {"HubTransferApp": {"log_level": logging.DEBUG}},
            "Log at DEBUG level.",
        ),
    }

    config_file = Unicode(
        help="""Python config file to load. Default: HUB_TRANSFER_CONFIG_FILE,
        else hub_transfer_config.py in the working directory, read only when it
        exists. A file named with --config or the variable must exist.
        """,
    ).tag(config=True)

    @default("config_file")
    def _config_file_default(self) -> str:
        return os.environ.get("HUB_TRANSFER_CONFIG_FILE", "hub_transfer_config.py")

    generate_config = Bool(
        False, help="Print a config file with every option, then exit."
    ).tag(config=True)

    service_prefix = Unicode(
        help="""URL prefix the hub's proxy routes to us, e.g.
        /services/hub-transfer/. Default: JUPYTERHUB_SERVICE_PREFIX, which the hub
        sets for managed services.
        """
    ).tag(config=True)

    @default("service_prefix")
    def _prefix_from_env(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/hub-transfer/")

    @validate("service_prefix")
    def _slashes(self, proposal: t.Any) -> str:
        return "/" + proposal["value"].strip("/") + "/"

    bind_url = Unicode(
        help="""Address to listen on, as a URL. Default: HUB_TRANSFER_BIND_URL, else
        JUPYTERHUB_SERVICE_URL (the URL the hub's proxy uses to reach us), else
        http://127.0.0.1:10101. On Kubernetes set HUB_TRANSFER_BIND_URL to
        http://0.0.0.0:10101 so the proxy pod can reach the hub pod.
        """
    ).tag(config=True)

    @default("bind_url")
    def _bind_url_from_env(self) -> str:
        return (
            os.environ.get("HUB_TRANSFER_BIND_URL")
            or os.environ.get("JUPYTERHUB_SERVICE_URL")
            or "http://127.0.0.1:10101"
        )

    max_body_size = Integer(
        1024 * 1024,
        help="Largest request body accepted, in bytes; larger gets a JSON 413.",
    ).tag(config=True)

    cookie_secret = Bytes(
        help="""Key that signs the OAuth cookie of browser sessions. Default:
        HUB_TRANSFER_COOKIE_SECRET (hex), else random at each start, which only
        means browser users log in again after a restart.
        """
    ).tag(config=True)

    @default("cookie_secret")
    def _cookie_secret_default(self) -> bytes:
        from_env = os.environ.get("HUB_TRANSFER_COOKIE_SECRET", "").strip()
        if from_env:
            return bytes.fromhex(from_env)
        return secrets.token_bytes(32)

    shutdown_grace = Float(
        5.0,
        help="""Seconds in-flight requests may take to finish after SIGTERM or
        SIGINT before the service exits anyway. Keep it well under the hub's own
        30 s wait.
        """,
    ).tag(config=True)

    db_url = Unicode(
        help="""SQLAlchemy URL of the database that tracks ACL rules and the tasks
        holding them (ACL mode only). Default: HUB_TRANSFER_DB_URL, else a SQLite
        file hub_transfer.sqlite in the working directory.
        """
    ).tag(config=True)

    @default("db_url")
    def _db_url_from_env(self) -> str:
        return os.environ.get("HUB_TRANSFER_DB_URL", "sqlite:///hub_transfer.sqlite")

    request_timeout = Float(
        20.0,
        help="""Seconds a submission may take in all, Globus calls included, before
        the caller gets 504. The JupyterLab extension waits for us without a
        timeout, blocking the user's server meanwhile, so keep this short.
        """,
    ).tag(config=True)

    hub_timeout = Float(
        10.0,
        help="Seconds to wait for JupyterHub to say who is calling; then 504.",
    ).tag(config=True)

    metrics_token = Unicode(
        help="""Bearer token that may read {prefix}metrics without a hub login
        (for a Prometheus scraper). Hub admins may always read it. Default:
        HUB_TRANSFER_METRICS_TOKEN; empty means hub admins only.
        """
    ).tag(config=True)

    @default("metrics_token")
    def _metrics_token_from_env(self) -> str:
        return os.environ.get("HUB_TRANSFER_METRICS_TOKEN", "").strip()

    allow_origin = Unicode(
        "",
        help="""Origin allowed to call the API from a browser (CORS). Empty, the
        default, sends no CORS headers: the JupyterLab extension calls from its
        server, not from the browser, and needs none.
        """,
    ).tag(config=True)

    hub_auth = Instance(HubOAuth, allow_none=True)
    submitter = Instance(TransferSubmitter, allow_none=True)
    access = Instance(AccessManager, allow_none=True)
    policy = Instance(AccessPolicy, allow_none=True)
    store = Instance(Store, allow_none=True)
    reconciler = Instance(Reconciler, allow_none=True)
    limits = Instance(UserLimits, allow_none=True)
    binding = Instance(IdentityBinding, allow_none=True)
    metrics = Instance(Metrics, allow_none=True)

    # built by init_tornado / start
    tornado_app = Instance(web.Application, allow_none=True)
    http_server = Instance(httpserver.HTTPServer, allow_none=True)

    log_level = Enum(
        (0, 10, 20, 30, 40, 50, "DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"),
        default_value=logging.INFO,
        help="Log level, by value or name. INFO logs each request and each rule.",
    ).tag(config=True)

    @default("log_datefmt")
    def _log_datefmt_default(self) -> str:
        return "%Y-%m-%d %H:%M:%S"

    @default("log")
    def _our_log(self) -> logging.Logger:
        log = logging.getLogger("hub_transfer")
        init_logging(log, logging.INFO)
        return log

    # ------------------------------------------------------------------
    # set-up

    @catch_config_error
    def initialize(self, argv: list[str] | None = None) -> None:
        super().initialize(argv)
        if self.generate_config:
            return
        self.load_config()
        init_logging(self.log, int(self.log_level))  # type: ignore[call-overload]
        self.init_hub_auth()
        self.init_submitter()
        self.init_access()
        self.init_tornado()

    def load_config(self) -> None:
        """Load the config file; only a file the admin named must exist."""
        named = "config_file" in self.config.get("HubTransferApp", {}) or bool(
            os.environ.get("HUB_TRANSFER_CONFIG_FILE")
        )
        if os.path.exists(self.config_file):
            self.load_config_file(self.config_file)
        elif named:
            raise StartupError(f"config file {self.config_file} does not exist")

    def init_hub_auth(self) -> None:
        if self.hub_auth is None:
            self.hub_auth = ServiceHubAuth(parent=self, cache_max_age=60)

    def init_submitter(self) -> None:
        if self.submitter is None:
            self.submitter = TransferSubmitter(parent=self, log=self.log)
        if self.metrics is None:
            self.metrics = Metrics()
        self.submitter.metrics = self.metrics
        if self.limits is None:
            self.limits = UserLimits(parent=self)
        if self.binding is None:
            self.binding = IdentityBinding(parent=self)

    def init_access(self) -> None:
        """Set up ACL mode when a collection is configured; otherwise stay off."""
        if self.access is not None:
            return
        assert self.submitter is not None
        access = AccessManager(parent=self, submitter=self.submitter)
        if not access.enabled:
            return
        try:
            crypt = CryptKeeper()
        except CryptKeyError as exc:
            raise StartupError(str(exc)) from None
        self.store = Store(self.db_url)
        try:
            self.store.upgrade()
        except SchemaError as exc:
            raise StartupError(str(exc)) from None
        self.submitter.keep_refresh_tokens = True
        access.store, access.crypt = self.store, crypt
        self.access = access
        self.policy = AccessPolicy(parent=self)
        self.log.info(
            "ACL mode on: collection %s, user area %s, at most %d rules",
            self.access.collection_id,
            self.policy.path_template,
            self.access.max_rules,
        )
        if not self.binding or not self.binding.enabled:
            self.log.warning(
                "ACL mode without IdentityBinding: a hub user may submit with "
                "any Globus identity's token, and that identity gets the rules "
                "in the hub user's area"
            )

    async def check_globus(self) -> None:
        """Prove at start that Globus accepts our client, and in ACL mode that it
        may manage the collection's rules.

        A refusal (wrong secret, no Access Manager role, unknown collection) is
        a configuration error and stops the service with one line. Globus being
        unreachable or failing is not: JupyterHub takes the whole hub down when
        a managed service dies at start, so the service starts and retries.
        """
        assert self.submitter is not None
        submitter = self.submitter
        await self._start_check(
            "client credentials",
            # introspecting a token that cannot exist costs nothing and fails
            # only if Globus Auth rejects the client itself
            submitter.call(
                "introspect",
                lambda: submitter.auth_client.oauth2_token_introspect("start-check"),
            ),
        )
        if self.access is not None:
            rules = await self._start_check(
                f"ACL rules of collection {self.access.collection_id}",
                self.access.acl.list_rules(),
            )
            if rules is not None:
                self.log.info(
                    "Collection %s: the client may manage its rules (%d present)",
                    self.access.collection_id,
                    len(rules),
                )

    async def _start_check(self, what: str, check: t.Awaitable[T]) -> T | None:
        try:
            return await check
        except ServiceError as exc:
            if exc.error in TRANSIENT_ERRORS:
                self.log.warning(
                    "Could not check the %s at start (%s: %s); carrying on, Globus "
                    "calls will be retried",
                    what,
                    exc.error,
                    exc.message,
                )
                return None
            hint = {
                "service_credentials_rejected": "check GLOBUS_CLIENT_ID and "
                "GLOBUS_CLIENT_SECRET",
                404: "check GLOBUS_COLLECTION_ID",
                403: "the service's client needs the Access Manager role on the "
                "collection",
            }
            advice = (
                hint.get(exc.error) or hint.get(exc.status_code) or ("see the message")
            )
            raise StartupError(
                f"Globus refused the {what} check ({exc.error}: {exc.message}); "
                f"{advice}"
            ) from None

    def check_settings(self) -> None:
        """Refuse to start half-configured: one line naming what is missing."""
        assert self.submitter is not None
        missing = self.submitter.missing_settings()
        if missing:
            raise StartupError("missing required setting(s): " + ", ".join(missing))

    def route(self, path: str) -> str:
        return self.service_prefix + path

    def init_tornado(self) -> None:
        """Build the Tornado application; every route gets its collaborators."""
        kwargs = {
            "hub_auth": self.hub_auth,
            "submitter": self.submitter,
            "max_body_size": self.max_body_size,
            "access": self.access,
            "policy": self.policy,
            "test_pause": _test_pause_from_env(),
            "limits": self.limits,
            "binding": self.binding,
            "request_timeout": self.request_timeout,
            "metrics": self.metrics,
            "metrics_token": self.metrics_token,
        }
        routes: list[t.Any] = [
            (self.route(path) + r"/?" if path else self.route(path), handler, kwargs)
            for path, handler in default_handlers
        ]
        routes.append((self.route("oauth_callback"), OAuthCallbackHandler, kwargs))
        self.handlers_in_flight: weakref.WeakSet[web.RequestHandler] = weakref.WeakSet()
        # submits that must finish even when their caller stopped waiting
        self.background_tasks: set[asyncio.Future[t.Any]] = set()
        # set at SIGINT/SIGTERM: new requests are turned away from then on
        self.stopping = asyncio.Event()
        self.tornado_app = web.Application(
            routes,
            cookie_secret=self.cookie_secret,
            log_function=log_request,
            in_flight=self.handlers_in_flight,
            background=self.background_tasks,
            stopping=self.stopping,
            hub_timeout=self.hub_timeout,
            metrics=self.metrics,
            allow_origin=self.allow_origin,
            default_handler_class=NotFoundHandler,
            default_handler_args={"hub_auth": self.hub_auth},
        )

    # ------------------------------------------------------------------
    # running and stopping

    def start(self) -> None:
        if self.generate_config:
            print(self.generate_config_file())
            return
        self.check_settings()
        asyncio.run(self.serve())

    async def start_access(self) -> None:
        """Check Globus; in ACL mode also settle leftovers and start polling."""
        await self.check_globus()
        if self.access is None:
            return
        await self.access.recover()
        self.reconciler = Reconciler(self.access)
        self.reconciler.start()

    async def serve(self) -> None:
        """Listen until SIGINT or SIGTERM, then stop cleanly."""
        assert self.tornado_app is not None
        await self.start_access()
        assert self.metrics is not None
        lag_watch = asyncio.get_running_loop().create_task(
            self.metrics.watch_loop_lag()
        )
        url = urlparse(self.bind_url)
        host = url.hostname or "127.0.0.1"
        port = url.port or 10101

        # tornado drops connections over max_buffer_size; our handler answers a
        # JSON 413 first, so leave tornado's own limit comfortably above ours
        # no xheaders: it costs a resolver call per request and trusts a
        # client's X-Real-Ip; handlers read the scheme and the access log the
        # address from what the proxy itself adds
        self.http_server = httpserver.HTTPServer(
            self.tornado_app,
            max_body_size=self.max_body_size * 2,
            idle_connection_timeout=60,
            body_timeout=30,
        )
        self.http_server.listen(port, host)
        self.log.info(
            "hub-transfer %s listening on %s:%s, routes under %s",
            __version__,
            host,
            port,
            self.service_prefix,
        )

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig, stop)
        await stop.wait()
        lag_watch.cancel()
        await self.shutdown()

    def _on_signal(self, sig: int, stop: asyncio.Event) -> None:
        if stop.is_set():
            self.log.warning("Second %s: exiting now", signal.Signals(sig).name)
            os._exit(1)
        self.log.info("%s received: shutting down", signal.Signals(sig).name)
        stop.set()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, release resources.

        Requests arriving on the proxy's kept-alive connections after the
        signal get a 503 that closes the connection, so the grace period is
        spent on the requests already under way.
        """
        self.stopping.set()
        if self.http_server is not None:
            self.http_server.stop()

        deadline = asyncio.get_running_loop().time() + self.shutdown_grace
        while self.pending_requests() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        left = self.pending_requests()
        if left:
            # answer what is still running rather than dropping it
            self.log.warning("Cutting short %d request(s) still in flight", left)
            for handler in list(self.handlers_in_flight):
                stop = getattr(handler, "stop_for_shutdown", None)
                if stop is not None and not handler._finished:
                    stop()
            # requests already submitting are left to finish: cutting them
            # would answer 503 for a transfer that reached Globus
            deadline = asyncio.get_running_loop().time() + self.shutdown_grace
            while (
                self.pending_requests() and asyncio.get_running_loop().time() < deadline
            ):
                await asyncio.sleep(0.05)

        # submits whose callers stopped waiting still confirm or revoke
        if self.background_tasks:
            await asyncio.wait(list(self.background_tasks), timeout=self.shutdown_grace)
        if self.access is not None:
            await self.access.settle_background(self.shutdown_grace)

        if self.http_server is not None:
            await self.http_server.close_all_connections()
        if self.reconciler is not None:
            await self.reconciler.stop()
        if self.submitter is not None:
            self.submitter.close()
        if self.store is not None:
            self.store.close()
        self.log.info("hub-transfer stopped")

    def pending_requests(self) -> int:
        return sum(1 for h in self.handlers_in_flight if not h._finished)


def _test_pause_from_env() -> tuple[str, float] | None:
    """A pause between rule creation and submit, for crash-recovery tests only."""
    label = os.environ.get("HUB_TRANSFER_TEST_PAUSE_LABEL")
    if not label:
        return None
    return label, float(os.environ.get("HUB_TRANSFER_TEST_PAUSE_SECONDS", "30"))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``hub-transfer`` and ``python -m hub_transfer``."""
    app = HubTransferApp()
    try:
        app.initialize(argv)
        app.start()
    except StartupError as exc:
        print(f"hub-transfer: cannot start: {exc}", file=sys.stderr)
        sys.exit(1)
