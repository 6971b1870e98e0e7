"""Globus Auth + Transfer stand-in for hub_transfer's tests and demo.

A small Tornado server on 127.0.0.1 that answers the Globus Auth and
Transfer calls hub_transfer makes, so the real globus-sdk can be exercised
over real HTTP.  globus-sdk is pointed at it with its own variables::

    GLOBUS_SDK_SERVICE_URL_AUTH=http://127.0.0.1:PORT/auth/
    GLOBUS_SDK_SERVICE_URL_TRANSFER=http://127.0.0.1:PORT/transfer/

Run it with ``python -m hub_transfer.testing.standin --port 0``; it prints
``hub-transfer-globus-standin listening on http://127.0.0.1:PORT``.  Tests
drive it through the JSON control API under ``/_standin/`` using
``StandInProcess`` (a subprocess) or ``StandInThread`` (same process, own
event loop, state inspectable as ``.state``).  The rules themselves live in
``standin_state``; the HTTP layer in ``standin_handlers``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import logging
import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys
import threading
import types
import typing as t
import urllib.error
import urllib.parse
import urllib.request
import uuid

import tornado.httpserver
import tornado.netutil
import tornado.web

from .standin_control import control_dispatch
from .standin_handlers import make_app
from .standin_state import (
    AUTH_RESOURCE_SERVER,
    CUSTOM_SCOPE_PREFIX,
    DEFAULT_ACL_LIMIT,
    DEFAULT_EXPIRES_IN,
    DEFAULT_SCOPE_SUFFIX,
    OPERATIONS,
    TRANSFER_RESOURCE_SERVER,
    TRANSFER_SCOPE,
    ControlError,
    OAuthError,
    StandInError,
    StandInState,
    TransferError,
)

log = logging.getLogger(__name__)

__all__ = [
    "AUTH_RESOURCE_SERVER",
    "LISTEN_PREFIX",
    "OPERATIONS",
    "TRANSFER_RESOURCE_SERVER",
    "TRANSFER_SCOPE",
    "ControlError",
    "OAuthError",
    "StandInControl",
    "StandInControlError",
    "StandInError",
    "StandInProcess",
    "StandInState",
    "StandInThread",
    "TransferError",
    "control_dispatch",
    "custom_scope",
    "main",
    "make_app",
    "service_env",
]

LISTEN_PREFIX = "hub-transfer-globus-standin listening on "
_LISTEN_RE = re.compile(re.escape(LISTEN_PREFIX) + r"(http://\S+)")
_PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Services hub_transfer does not use are pointed at the stand-in as well, so a
# stray SDK client answers with a logged 404 instead of reaching real Globus.
_OTHER_SDK_SERVICES = ("groups", "search", "timer", "flows", "compute", "actions")


def custom_scope(client_id: str, suffix: str = DEFAULT_SCOPE_SUFFIX) -> str:
    """The custom scope string the stand-in creates for a client."""
    return f"{CUSTOM_SCOPE_PREFIX}{client_id}/{suffix}"


def service_env(url: str) -> dict[str, str]:
    """Environment that points globus-sdk (and only loopback) at the stand-in.

    ``NO_PROXY`` is extended because requests would otherwise send loopback
    traffic to an ``HTTP_PROXY`` configured in the environment.
    """
    base = url.rstrip("/")
    env = {
        "GLOBUS_SDK_ENVIRONMENT": "production",
        "GLOBUS_SDK_SERVICE_URL_AUTH": f"{base}/auth/",
        "GLOBUS_SDK_SERVICE_URL_TRANSFER": f"{base}/transfer/",
    }
    for service in _OTHER_SDK_SERVICES:
        env[f"GLOBUS_SDK_SERVICE_URL_{service.upper()}"] = f"{base}/{service}/"

    existing = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    hosts = [h for h in existing.split(",") if h.strip()]
    for host in ("127.0.0.1", "localhost", "::1"):
        if host not in hosts:
            hosts.append(host)
    env["NO_PROXY"] = env["no_proxy"] = ",".join(hosts)
    return env


class StandInControlError(RuntimeError):
    """A control API request was refused; ``payload`` says why."""

    def __init__(self, status: int, payload: t.Any) -> None:
        message = payload.get("message") if isinstance(payload, dict) else payload
        super().__init__(f"stand-in control call failed ({status}): {message}")
        self.status = status
        self.payload = payload


def _without_none(**fields: t.Any) -> dict[str, t.Any]:
    return {name: value for name, value in fields.items() if value is not None}


class StandInControl:
    """Control helpers shared by ``StandInProcess`` and ``StandInThread``.

    Subclasses supply ``url`` and ``_control``; every helper is one control
    API request and returns its decoded JSON answer.
    """

    _url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("stand-in is not running")
        return self._url

    def start(self) -> t.Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> t.Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    def _control(
        self,
        method: str,
        path: str,
        body: dict[str, t.Any] | None = None,
        query: dict[str, str] | None = None,
    ) -> t.Any:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """Variables to set so globus-sdk clients talk to this stand-in."""
        return service_env(self.url)

    def create_client(
        self,
        client_id: str | None = None,
        client_secret: str | None = None,
        *,
        scope_suffix: str = DEFAULT_SCOPE_SUFFIX,
        access_manager_of: t.Iterable[str] = (),
        dependent_scopes: list[str] | None = None,
        name: str | None = None,
        seed: bool = False,
    ) -> dict[str, t.Any]:
        """Register a confidential client; the answer has ``client_id``,
        ``client_secret`` and ``scope`` (its custom scope)."""
        body = _without_none(
            client_id=client_id,
            client_secret=client_secret,
            scope_suffix=scope_suffix,
            access_manager_of=list(access_manager_of),
            dependent_scopes=dependent_scopes,
            name=name,
            seed=seed,
        )
        return self._control("POST", "clients", body)

    def clients(self) -> list[dict[str, t.Any]]:
        return self._control("GET", "clients")

    def create_identity(
        self,
        username: str,
        *,
        name: str | None = None,
        email: str | None = None,
        identity_id: str | None = None,
    ) -> dict[str, t.Any]:
        body = _without_none(
            username=username, name=name, email=email, identity_id=identity_id
        )
        return self._control("POST", "identities", body)

    def issue_token(
        self,
        identity: str,
        scope: str | None = None,
        *,
        client_id: str | None = None,
        expires_in: int | None = None,
        active: bool = True,
        issued_to: str | None = None,
        refresh: bool = False,
    ) -> dict[str, t.Any]:
        """Issue a user token (by identity id or username) for ``scope`` or
        for ``client_id``'s custom scope; ``["access_token"]`` is the value."""
        body = _without_none(
            identity=identity,
            scope=scope,
            client_id=client_id,
            expires_in=expires_in,
            active=active,
            issued_to=issued_to,
            refresh=refresh,
        )
        return self._control("POST", "tokens", body)

    def revoke_token(self, token: str) -> bool:
        return bool(self._control("POST", "tokens/revoke", {"token": token})["revoked"])

    def update_token(
        self, token: str, *, expires_in: int | None = None, active: bool | None = None
    ) -> dict[str, t.Any]:
        body = _without_none(token=token, expires_in=expires_in, active=active)
        return self._control("POST", "tokens/update", body)

    def token_info(self, token: str) -> dict[str, t.Any]:
        return self._control("POST", "tokens/info", {"token": token})

    def set_consent_required(
        self, identity_id: str, value: bool = True, collections: t.Iterable[str] = ()
    ) -> dict[str, t.Any]:
        body = {"value": value, "collections": list(collections)}
        return self._control("POST", f"identities/{identity_id}/consent_required", body)

    def tasks(self) -> list[dict[str, t.Any]]:
        """All tasks, with ``owner_id``, ``submission_id`` and raw ``DATA``."""
        return self._control("GET", "tasks")

    def set_task_status(
        self,
        task_id: str,
        status: str,
        *,
        nice_status: str | None = None,
        fatal_error: dict[str, t.Any] | None = None,
        fields: dict[str, t.Any] | None = None,
    ) -> dict[str, t.Any]:
        body = _without_none(
            status=status,
            nice_status=nice_status,
            fatal_error=fatal_error,
            fields=fields,
        )
        return self._control("POST", f"tasks/{task_id}/status", body)

    def acl_rules(self, endpoint_id: str) -> list[dict[str, t.Any]]:
        return self._control("GET", f"acl/{endpoint_id}")

    def plant_acl_rule(
        self,
        endpoint_id: str,
        principal: str,
        path: str,
        permissions: str = "r",
        *,
        principal_type: str = "identity",
        expiration_date: str | None = None,
    ) -> dict[str, t.Any]:
        """Add a rule as if made outside the service (no checks, no cap)."""
        body = _without_none(
            principal=principal,
            path=path,
            permissions=permissions,
            principal_type=principal_type,
            expiration_date=expiration_date,
        )
        return self._control("POST", f"acl/{endpoint_id}", body)

    def add_access_manager(self, endpoint_id: str, client_id: str) -> None:
        body = {"endpoint_id": endpoint_id, "client_id": client_id}
        self._control("POST", "access_managers", body)

    def calls(self, operation: str | None = None) -> list[dict[str, t.Any]]:
        query = {"operation": operation} if operation else None
        return self._control("GET", "calls", None, query)

    def clear_calls(self) -> None:
        self._control("POST", "calls/clear")

    def add_fault(
        self,
        operation: str = "*",
        status: int | None = None,
        *,
        code: str | None = None,
        message: str | None = None,
        count: int | None = None,
        probability: float | None = None,
        hang: float | None = None,
        drop: bool = False,
        retry_after: int | None = None,
    ) -> dict[str, t.Any]:
        body = _without_none(
            operation=operation,
            status=status,
            code=code,
            message=message,
            count=count,
            probability=probability,
            hang=hang,
            drop=drop,
            retry_after=retry_after,
        )
        return self._control("POST", "faults", body)

    def clear_faults(self) -> None:
        self._control("DELETE", "faults")

    def set_latency(self, seconds: float) -> None:
        self._control("POST", "latency", {"seconds": seconds})

    def configure(self, **settings: t.Any) -> dict[str, t.Any]:
        """``default_expires_in``, ``dependent_expires_in``, ``acl_limit``,
        ``latency``."""
        return self._control("POST", "settings", settings)

    def advance_clock(self, seconds: float) -> float:
        return float(self._control("POST", "clock", {"advance": seconds})["now"])

    def reset(self) -> None:
        self._control("POST", "reset")


class StandInProcess(StandInControl):
    """The stand-in as a subprocess, as the demo and black-box tests run it.

    Usable as a context manager; ``start`` returns once the child printed
    its URL.  ``seed_client`` (id, secret, scope) is known before start when
    ``seed_client_id`` is given, so a service can be configured up front.
    """

    def __init__(
        self,
        *,
        latency_ms: float = 0.0,
        seed_client_id: str | None = None,
        seed_client_secret: str | None = None,
        seed_scope_suffix: str = DEFAULT_SCOPE_SUFFIX,
        seed_access_manager_of: t.Iterable[str] = (),
        state_file: str | os.PathLike[str] | None = None,
        extra_args: t.Sequence[str] = (),
        startup_timeout: float = 20.0,
        log_level: str = "WARNING",
    ) -> None:
        self.latency_ms = latency_ms
        self.state_file = state_file
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.seed_client: dict[str, str] | None = None
        self._seed_access_manager_of = list(seed_access_manager_of)
        self._seed_scope_suffix = seed_scope_suffix
        if seed_client_id or seed_client_secret:
            client_id = seed_client_id or str(uuid.uuid4())
            self.seed_client = {
                "client_id": client_id,
                "client_secret": seed_client_secret or secrets.token_urlsafe(32),
                "scope": custom_scope(client_id, seed_scope_suffix),
            }

        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._url: str | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "hub_transfer.testing.standin",
            "--port",
            "0",
            "--latency-ms",
            str(self.latency_ms),
            "--log-level",
            self.log_level,
        ]
        if self.seed_client is not None:
            cmd += [
                "--seed-client-id",
                self.seed_client["client_id"],
                "--seed-client-secret",
                self.seed_client["client_secret"],
                "--seed-scope-suffix",
                self._seed_scope_suffix,
            ]
            for endpoint_id in self._seed_access_manager_of:
                cmd += ["--seed-access-manager-of", endpoint_id]
        if self.state_file is not None:
            cmd += ["--state-file", os.fspath(self.state_file)]
        return cmd + self.extra_args

    def start(self) -> StandInProcess:
        if self._proc is not None:
            raise RuntimeError("stand-in already started")

        env = dict(os.environ)
        python_path = [str(_PROJECT_ROOT)]
        if env.get("PYTHONPATH"):
            python_path.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(python_path)
        env["PYTHONUNBUFFERED"] = "1"

        self._proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(
            target=self._read_stdout, name="standin-stdout", daemon=True
        )
        self._reader.start()

        if not self._ready.wait(self.startup_timeout) or self._url is None:
            output = "\n".join(self._output)
            self.stop()
            raise RuntimeError(f"stand-in did not start; its output:\n{output}")
        log.info("stand-in process %s at %s", self._proc.pid, self._url)
        return self

    def _read_stdout(self) -> None:
        """Find the URL line, then keep draining so the child never blocks."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        for line in proc.stdout:
            self._output.append(line.rstrip("\n"))
            match = _LISTEN_RE.search(line)
            if match and self._url is None:
                self._url = match.group(1)
                self._ready.set()
        self._ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        if proc.stdout is not None:
            proc.stdout.close()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def output(self) -> list[str]:
        """The child's recent stdout lines, for debugging a failed start."""
        return list(self._output)

    def _control(
        self,
        method: str,
        path: str,
        body: dict[str, t.Any] | None = None,
        query: dict[str, str] | None = None,
    ) -> t.Any:
        url = f"{self.url}/_standin/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(
            url,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )

        try:
            with self._opener.open(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode("utf-8", "replace")
            raise StandInControlError(err.code, payload) from None


class StandInThread(StandInControl):
    """The stand-in on its own event loop in a background thread.

    Why a thread and not the test's loop: globus-sdk is synchronous, so a
    service calling it from the loop would deadlock against a stand-in on
    that same loop.  ``state`` stays directly inspectable; the control
    helpers call the state without HTTP.
    """

    def __init__(self, state: StandInState | None = None, *, latency: float = 0.0):
        self.state = state if state is not None else StandInState(latency=latency)
        if state is not None and latency:
            state.configure(latency=latency)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._url: str | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> StandInThread:
        if self._thread is not None:
            raise RuntimeError("stand-in already started")
        self._thread = threading.Thread(
            target=self._run, name="standin-server", daemon=True
        )
        self._thread.start()

        if not self._ready.wait(timeout):
            raise RuntimeError("stand-in thread did not start in time")
        if self._error is not None:
            raise RuntimeError("stand-in thread failed to start") from self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except Exception as err:
            # Reported by start(), which is waiting on _ready.
            self._error = err
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        server, url = _listen(make_app(self.state), "127.0.0.1", 0)
        self._url = url
        self._ready.set()

        await self._stop_event.wait()
        server.stop()
        await server.close_all_connections()

    def stop(self, timeout: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        thread.join(timeout)

    def _control(
        self,
        method: str,
        path: str,
        body: dict[str, t.Any] | None = None,
        query: dict[str, str] | None = None,
    ) -> t.Any:
        status, payload = control_dispatch(self.state, method, path, body, query)
        if status >= 400:
            raise StandInControlError(status, payload)

        # A JSON round trip gives callers the same plain data HTTP would.
        return json.loads(json.dumps(payload))


def _listen(
    app: tornado.web.Application, host: str, port: int
) -> tuple[tornado.httpserver.HTTPServer, str]:
    """Bind (port 0 picks a free port) and return the server and its URL."""
    sockets = tornado.netutil.bind_sockets(port, host)
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)

    bound_port = sockets[0].getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    return server, f"http://{url_host}:{bound_port}"


def _loopback_host(value: str) -> str:
    """Accept only loopback addresses: the stand-in must never be reachable
    from elsewhere (it has an unauthenticated control API)."""
    host = "127.0.0.1" if value == "localhost" else value
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address") from None
    if not address.is_loopback:
        raise argparse.ArgumentTypeError(f"{value!r} is not a loopback address")
    return host


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hub-transfer-globus-standin",
        description="Globus Auth + Transfer stand-in for hub_transfer tests/demo. "
        "Point globus-sdk at it with GLOBUS_SDK_SERVICE_URL_AUTH=<url>/auth/ and "
        "GLOBUS_SDK_SERVICE_URL_TRANSFER=<url>/transfer/.",
        epilog="Control API (JSON bodies, loopback only) under <url>/_standin/: "
        "POST clients, POST identities {username}, POST tokens {identity, "
        "client_id} (a user token for the client's scope), POST "
        "tasks/<id>/status {status}, GET tasks, GET acl/<collection>, POST "
        "access_managers {client_id, endpoint_id}, POST faults {operation, "
        "status|hang|drop}, GET calls, POST reset.",
    )
    parser.add_argument("--host", type=_loopback_host, default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="added to every API call"
    )
    parser.add_argument("--expires-in", type=int, default=DEFAULT_EXPIRES_IN)
    parser.add_argument("--acl-limit", type=int, default=DEFAULT_ACL_LIMIT)
    parser.add_argument("--random-seed", type=int, default=None)
    parser.add_argument("--seed-client-id", default=None)
    parser.add_argument("--seed-client-secret", default=None)
    parser.add_argument("--seed-scope-suffix", default=DEFAULT_SCOPE_SUFFIX)
    parser.add_argument(
        "--seed-access-manager-of",
        action="append",
        default=[],
        metavar="ENDPOINT_ID",
        help="make the seed client Access Manager of this endpoint (repeatable)",
    )
    parser.add_argument(
        "--state-file",
        default=None,
        help="write url, env and the seed client's credentials here as JSON",
    )
    parser.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hub_transfer.testing.standin``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    state = StandInState(
        latency=args.latency_ms / 1000.0,
        default_expires_in=args.expires_in,
        acl_limit=args.acl_limit,
        random_seed=args.random_seed,
    )
    seeding = bool(args.seed_client_id or args.seed_client_secret)
    if args.seed_access_manager_of and not seeding:
        build_parser().error("--seed-access-manager-of needs --seed-client-id")
    seed: dict[str, t.Any] | None = None
    if seeding:
        client = state.add_seed_client(
            client_id=args.seed_client_id,
            client_secret=args.seed_client_secret,
            scope_suffix=args.seed_scope_suffix,
            access_manager_of=args.seed_access_manager_of,
        )
        seed = client.to_dict()

    try:
        asyncio.run(_serve_forever(state, args.host, args.port, args.state_file, seed))
    except KeyboardInterrupt:
        pass
    return 0


async def _serve_forever(
    state: StandInState,
    host: str,
    port: int,
    state_file: str | None,
    seed: dict[str, t.Any] | None,
) -> None:
    server, url = _listen(make_app(state), host, port)

    if state_file:
        _write_state_file(state_file, url, seed)
    print(f"{LISTEN_PREFIX}{url}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    log.info("stand-in shutting down")
    server.stop()
    await server.close_all_connections()


def _write_state_file(path: str, url: str, seed: dict[str, t.Any] | None) -> None:
    """Atomically write what a demo script needs to talk to this stand-in."""
    document = {
        "url": url,
        "pid": os.getpid(),
        "env": service_env(url),
        "seed_client": seed,
    }
    target = pathlib.Path(path)
    temporary = target.with_name(target.name + ".tmp")

    # Owner-only: the file holds a client secret, even if only a test one.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, target)


if __name__ == "__main__":
    raise SystemExit(main())
