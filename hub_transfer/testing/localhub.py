"""A real JupyterHub on 127.0.0.1 running hub-transfer as its managed service.

Used by the end-to-end tests, the demo and the crash and stress tests. The hub
runs as a subprocess (``python -m jupyterhub -f`` the ``jupyterhub_config.py``
next to this module) from whichever interpreter the caller names, so the same
code drives JupyterHub 5.5 and 6.1 by pointing at another venv. The service
comes from the admin-facing config fragment itself and is launched by the hub
with the hub's own ``sys.executable``, exactly as in production.

Every listener is on 127.0.0.1 and every wait is bounded. The hub's and the
service's output both go to one log file, which callers may grep. Nothing
outlives :meth:`LocalHub.stop`: the hub gets SIGINT, then SIGTERM, then SIGKILL,
and any child it leaves behind is killed by its pid (never by name).

A managed service that dies is started again by the hub, but only when the hub
next polls it: JupyterHub 5.5 and 6.1 poll every 30 s (with 10 % jitter), and
that interval is not configurable for services. ``service_poll_interval``
shortens it, for tests only, by patching a private JupyterHub class.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import typing as t

import requests

from .standin import StandInProcess

SERVICE = "hub-transfer"
HUB_CONFIG = pathlib.Path(__file__).resolve().with_name("jupyterhub_config.py")
DEFAULT_USERS = ("alice", "bob")

# the hub needs ~2 s to come up (the service ~1 s more); CI machines are slower
START_TIMEOUT = 45.0
# JupyterHub gives a managed service 10 s after SIGINT before SIGTERM
STOP_TIMEOUT = 20.0
# a killed service comes back at the hub's next poll: up to 33 s, plus its start
RESTART_TIMEOUT = 45.0

# variables of the caller's shell that must not leak into the hub: real Globus
# settings, another hub's settings, the proxy's auth token
_DROPPED_PREFIXES = (
    "GLOBUS_",
    "HUB_TRANSFER_",
    "LOCALHUB_",
    "JUPYTERHUB_",
    "CONFIGPROXY_",
)


class LocalHubError(RuntimeError):
    """The hub or its service did not do what was asked in time."""


def http(method: str, url: str, **kwargs: t.Any) -> requests.Response:
    """One request with no cookies kept and no proxy taken from the environment.

    Everything here listens on 127.0.0.1 and must be reached there, even from a
    shell with HTTP_PROXY set; and a fresh session per call means no request
    carries a cookie an earlier answer set, as the extension's calls carry none.
    """
    kwargs.setdefault("timeout", 10)
    kwargs.setdefault("allow_redirects", False)
    with requests.Session() as session:
        session.trust_env = False
        return session.request(method, url, **kwargs)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now on 127.0.0.1.

    All are held open until every one is picked, so the kernel cannot hand out
    the same port twice; they are released for the hub to bind.
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def proxy_on_path(path: str | None = None) -> str | None:
    """Where configurable-http-proxy is on ``path`` (default: PATH), if anywhere.

    The hub starts the proxy by name, so it must be found on the hub's PATH;
    callers check this first to skip, or fail with a clear message.
    """
    return shutil.which("configurable-http-proxy", path=path)


# ----------------------------------------------------------------------
# processes, read from /proc (Linux only)


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after it
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def argv_of(pid: int) -> list[str]:
    """The argv of ``pid`` (empty once it is gone)."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode("utf-8", "replace").split("\0")[:-1]


def cmdline_of(pid: int) -> str:
    return " ".join(argv_of(pid))


def environ_of(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (empty once it is gone)."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.partition("=") for item in raw.decode("utf-8", "replace").split("\0"))
    return {key: value for key, _, value in pairs if key}


def alive(pid: int) -> bool:
    """True while ``pid`` runs; an exited but unreaped child counts as gone.

    The hub reaps a dead service only at its next poll, up to 30 s later, so
    the zombie must not count as running meanwhile.
    """
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> float | None:
    """Seconds until ``pid`` exited, or None if it still runs at ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not alive(pid):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


# ----------------------------------------------------------------------
# Globus


@dataclasses.dataclass
class GlobusSetup:
    """The Globus stand-in, the service's client there and some users' identities.

    The client is what a hub admin registers at Globus for the service; each
    user gets an identity ``<user>@example.org``, as if they had logged in to
    Globus from JupyterLab.
    """

    standin: StandInProcess
    client_id: str
    client_secret: str
    scope: str
    identities: dict[str, dict[str, t.Any]]

    @classmethod
    def start(
        cls,
        users: t.Iterable[str] = DEFAULT_USERS,
        *,
        client_name: str = "hub-transfer",
        access_manager_of: t.Iterable[str] = (),
    ) -> GlobusSetup:
        """Start a stand-in and register the client and identities there.

        ``access_manager_of`` lists collections the client may manage the ACL
        rules of, as ACL mode needs. The caller must :meth:`stop` it.
        """
        standin = StandInProcess()
        try:
            standin.start()
            client = standin.create_client(
                name=client_name, access_manager_of=access_manager_of
            )
            identities = {
                user: standin.create_identity(f"{user}@example.org") for user in users
            }
        except BaseException:
            standin.stop()
            raise
        return cls(
            standin=standin,
            client_id=client["client_id"],
            client_secret=client["client_secret"],
            scope=client["scope"],
            identities=identities,
        )

    def stop(self) -> None:
        self.standin.stop()

    def __enter__(self) -> GlobusSetup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def service_env(self) -> dict[str, str]:
        """What the service needs to use this client at this stand-in."""
        env = self.standin.env()
        env.update(
            {
                "GLOBUS_CLIENT_ID": self.client_id,
                "GLOBUS_CLIENT_SECRET": self.client_secret,
                "GLOBUS_TRANSFER_SUBMISSION_SCOPE": self.scope,
            }
        )
        return env

    def identity_id(self, user: str) -> str:
        return str(self.identities[user]["id"])

    def token(self, user: str, scope: str | None = None) -> str:
        """A Globus token of ``user``'s identity for the service's scope, as the
        JupyterLab extension would hold after the user logged in to Globus."""
        answer = self.standin.issue_token(self.identity_id(user), scope or self.scope)
        return str(answer["access_token"])


# ----------------------------------------------------------------------
# the hub


class LocalHub:
    """A JupyterHub subprocess with hub-transfer as its managed service.

    :param scratch: directory for the hub's database, secrets, log and the
        server tokens; the caller owns it (the log is still there after stop)
    :param python: interpreter that runs the hub, and therefore the service
    :param users: hub users DummyAuthenticator lets in (any password)
    :param service_env: variables for the service, e.g. ``GLOBUS_COLLECTION_ID``
        or ``HUB_TRANSFER_CRYPT_KEY``; they reach it through the config
        fragment, which passes ``GLOBUS_*`` and ``HUB_TRANSFER_*`` (among
        others) on, and :meth:`start` checks that each one did
    :param service_poll_interval: seconds between the hub's checks that the
        service still runs (hence how soon a killed service is restarted);
        None keeps JupyterHub's own 30 s
    """

    def __init__(
        self,
        scratch: str | os.PathLike[str],
        *,
        python: str | None = None,
        users: t.Iterable[str] = DEFAULT_USERS,
        service_env: t.Mapping[str, str] | None = None,
        service_poll_interval: int | None = None,
        fragment: str | os.PathLike[str] | None = None,
        config_file: str | os.PathLike[str] = HUB_CONFIG,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.scratch = pathlib.Path(scratch)
        self.python = python or sys.executable
        self.users = tuple(users)
        self.service_env = dict(service_env or {})
        self.service_poll_interval = service_poll_interval
        self.fragment = fragment
        self.config_file = pathlib.Path(config_file)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout

        self.log_path = self.scratch / "hub.log"
        self.admin_token = secrets.token_hex(32)
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}
        self.version = ""
        # pid -> command line of every child seen, for cleanup after the hub
        self.children: dict[int, str] = {}
        self.stopped: dict[str, t.Any] | None = None

    # ------------------------------------------------------------------
    # addresses

    @property
    def url(self) -> str:
        """The hub's public address: the proxy."""
        return f"http://127.0.0.1:{self.env['LOCALHUB_PORT']}"

    @property
    def hub_api_url(self) -> str:
        """The hub's own API, bypassing the proxy."""
        return f"http://127.0.0.1:{self.env['LOCALHUB_HUB_PORT']}/hub/api/"

    @property
    def service_url(self) -> str:
        """The service through the proxy, as the JupyterLab extension calls it."""
        return f"{self.url}/services/{SERVICE}/"

    @property
    def service_direct_url(self) -> str:
        """The service on its own port, bypassing the proxy."""
        port = self.env["HUB_TRANSFER_PORT"]
        return f"http://127.0.0.1:{port}/services/{SERVICE}/"

    # ------------------------------------------------------------------
    # starting

    def build_env(self) -> dict[str, str]:
        """The hub's environment: ours, minus anything that could leak in from
        the developer's shell (real Globus settings, proxies), plus the
        caller's service variables and the knobs the hub config reads."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(_DROPPED_PREFIXES)
            and not key.lower().endswith("_proxy")
        }

        # the hub's venv first on PATH, as its own `jupyterhub` would have it
        bin_dir = str(pathlib.Path(self.python).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        env.pop("VIRTUAL_ENV", None)
        env["PYTHONUNBUFFERED"] = "1"

        proxy, hub, proxy_api, service = free_ports(4)
        env["HUB_TRANSFER_PORT"] = str(service)
        env.update(self.service_env)
        env.update(
            {
                "LOCALHUB_DIR": str(self.scratch),
                "LOCALHUB_PORT": str(proxy),
                "LOCALHUB_HUB_PORT": str(hub),
                "LOCALHUB_PROXY_API_PORT": str(proxy_api),
                "LOCALHUB_ADMIN_TOKEN": self.admin_token,
                "LOCALHUB_USERS": ",".join(self.users),
            }
        )
        if self.fragment is not None:
            env["LOCALHUB_FRAGMENT"] = str(pathlib.Path(self.fragment).resolve())
        if self.service_poll_interval is not None:
            env["LOCALHUB_SERVICE_POLL_INTERVAL"] = str(self.service_poll_interval)
        return env

    def start(self) -> LocalHub:
        """Start the hub and return once the service answers through the proxy.

        :raises LocalHubError: the proxy is missing, the hub exited, or the hub
            or the service did not answer within ``start_timeout``
        """
        if self.proc is not None:
            raise LocalHubError("this hub was started already")
        self.env = self.build_env()
        if proxy_on_path(self.env["PATH"]) is None:
            raise LocalHubError(
                "configurable-http-proxy is not on PATH (scripts/setup.sh puts it "
                "in .tools/node_modules/.bin)"
            )

        # a session of its own: Ctrl-C in the caller's terminal must not reach
        # the hub directly, so stop() alone decides how it ends
        self.scratch.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.python, "-m", "jupyterhub", "-f", str(self.config_file)],
                cwd=self.scratch,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        # a hub that failed to come up, or whose caller was interrupted while
        # waiting, is stopped here: the caller may never learn it exists. A hub
        # that exits on its own (say the service failed at start) leaves the
        # proxy running, which stop() finds and kills.
        try:
            self._wait_until_up()
            self._check_service_env()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_up(self) -> None:
        """Poll until the hub API answers on its own port, the service on its
        own, and then the service through the proxy (its route comes last).

        Asking the proxy early would only fill the log with its 404s and its
        failed attempts to fetch the hub's error page.
        """
        deadline = time.monotonic() + self.start_timeout
        health = f"/services/{SERVICE}/api/health"
        port = self.env["HUB_TRANSFER_PORT"]
        steps = [
            ("the hub API", self.hub_api_url),
            ("the service", f"http://127.0.0.1:{port}{health}"),
            ("the service through the proxy", self.url + health),
        ]
        while steps and time.monotonic() < deadline:
            self._check_running("while starting")
            self.remember_children()
            what, url = steps[0]
            response = _get(url)
            if response is not None and response.status_code == 200:
                if what == "the hub API":
                    self.version = response.json()["version"]
                steps.pop(0)
                continue
            time.sleep(0.1)
        if steps:
            raise LocalHubError(
                f"{steps[0][0]} did not answer within {self.start_timeout:.0f} s; "
                f"log tail:\n{self.log_tail()}"
            )

    def _check_service_env(self) -> None:
        """Fail now if a variable meant for the service never reached it.

        The fragment passes on only some variables; one it drops would make a
        test pass or fail for the wrong reason, silently.
        """
        pid = self.service_pid()
        if pid is None:
            raise LocalHubError(f"no service process under the hub:\n{self.log_tail()}")
        seen = environ_of(pid)
        lost = sorted(k for k, v in self.service_env.items() if seen.get(k) != v)
        if lost:
            raise LocalHubError(
                "these variables did not reach the service as given (the config "
                f"fragment does not pass them on): {', '.join(lost)}"
            )

    def _check_running(self, doing: str) -> None:
        if self.proc is None:
            raise LocalHubError("the hub was not started")
        if self.proc.poll() is not None:
            raise LocalHubError(
                f"jupyterhub exited with {self.proc.returncode} {doing}; "
                f"log tail:\n{self.log_tail()}"
            )

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------
    # using it

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"

    def api(self, method: str, path: str, **kwargs: t.Any) -> requests.Response:
        """Call the hub REST API as the hub's admin service ``localhub-admin``.

        It may mint tokens for, and start the servers of, the hub's users, and
        nothing else.
        """
        headers = {"Authorization": f"token {self.admin_token}"}
        return http(method, self.hub_api_url + path, headers=headers, **kwargs)

    def mint_token(self, user: str, scopes: list[str], expires_in: int = 3600) -> str:
        """A new hub API token of ``user`` holding exactly ``scopes``."""
        response = self.api(
            "POST",
            f"users/{user}/tokens",
            json={"scopes": scopes, "note": "localhub", "expires_in": expires_in},
        )
        if response.status_code != 201:
            raise LocalHubError(f"could not mint a token for {user}: {response.text}")
        return str(response.json()["token"])

    def server_token(self, user: str, timeout: float = 15.0) -> str:
        """The API token the hub itself created for ``user``'s server.

        The extension calls the service with exactly that token, whose scopes
        the hub decides (``server`` role, ``server_token_scopes``, the user's
        own). The server is started through the REST API; the config's
        TokenSpawner writes the token it was given to the scratch directory.
        """
        path = self.scratch / "server-tokens" / user
        if not path.exists():
            response = self.api("POST", f"users/{user}/server")
            if response.status_code not in (201, 202):
                raise LocalHubError(f"could not start {user}'s server: {response.text}")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                model = self.api("GET", f"users/{user}").json()
                server = model.get("servers", {}).get("")
                if server and server.get("ready"):
                    break
                time.sleep(0.1)
            else:
                raise LocalHubError(
                    f"{user}'s server did not start in {timeout:g} s:\n"
                    f"{self.log_tail()}"
                )
        return path.read_text()

    # ------------------------------------------------------------------
    # the service process

    def service_pids(self) -> list[int]:
        """The hub's running children that run hub-transfer (one, normally)."""
        if self.proc is None:
            return []
        return [
            pid
            for pid in children_of(self.proc.pid)
            if "-m hub_transfer" in cmdline_of(pid) and alive(pid)
        ]

    def service_pid(self) -> int | None:
        pids = self.service_pids()
        return pids[0] if pids else None

    def kill_service(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Signal the service and wait, bounded, until it exited; its old pid.

        The hub notices only at its next poll and then starts a new one: see
        :meth:`wait_service_up`.
        """
        pid = self.service_pid()
        if pid is None:
            raise LocalHubError("no service process to kill")
        self.remember_children()
        os.kill(pid, sig)
        if wait_gone(pid, timeout) is None:
            raise LocalHubError(f"the service (pid {pid}) still runs after {sig!r}")
        return pid

    def wait_service_up(
        self, timeout: float = RESTART_TIMEOUT, *, not_pid: int | None = None
    ) -> int:
        """Wait until a service process answers, directly and through the
        proxy; its pid. With ``not_pid``, that one does not count, so after
        :meth:`kill_service` this waits for the hub's restart.

        :raises LocalHubError: the hub exited or ``timeout`` passed
        """
        deadline = time.monotonic() + timeout
        health = "api/health"
        while time.monotonic() < deadline:
            self._check_running("while waiting for the service")
            pid = self.service_pid()
            if (
                pid is not None
                and pid != not_pid
                and _answers(self.service_direct_url + health)
                and _answers(self.service_url + health)
            ):
                self.remember_children()
                return pid
            time.sleep(0.1)
        raise LocalHubError(
            f"no service answered within {timeout:g} s; log tail:\n{self.log_tail()}"
        )

    # ------------------------------------------------------------------
    # stopping

    def remember_children(self) -> None:
        """Note the hub's children (proxy, service) while it lives, so they can
        be found, and killed, even if the hub dies without stopping them."""
        if self.proc is not None and self.proc.poll() is None:
            for pid in children_of(self.proc.pid):
                # a child caught between fork and exec has no command line yet,
                # and an empty one could later match a stranger with none
                cmd = cmdline_of(pid)
                if cmd:
                    self.children[pid] = cmd

    def _leftovers(self) -> list[int]:
        """Our processes still running once the hub is gone.

        A pid counts only while its command line is still the one noted, so a
        reused pid is never killed. The proxy's pid file covers a hub that died
        before its children were noted.
        """
        found = {pid for pid, cmd in self.children.items() if cmdline_of(pid) == cmd}
        pid_file = self.scratch / "jupyterhub-proxy.pid"
        port = self.env.get("LOCALHUB_PORT", "")
        try:
            proxy = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            proxy = 0
        cmd = cmdline_of(proxy) if proxy else ""
        if "configurable-http-proxy" in cmd and f"--port {port} " in cmd + " ":
            found.add(proxy)
        return sorted(pid for pid in found if alive(pid))

    def stop(self) -> dict[str, t.Any]:
        """Stop the hub: SIGINT, then SIGTERM, then SIGKILL, each bounded.

        Returns how it went: the hub's exit code, seconds until the service and
        the hub exited after SIGINT, the last signal sent, and what had to be
        killed afterwards. Idempotent: later calls return the first answer.
        """
        if self.stopped is not None:
            return self.stopped
        outcome: dict[str, t.Any] = {"signal": None, "service_exit_s": None}
        if self.proc is None:
            outcome.update(hub_exit_s=0.0, returncode=None, leftovers=[])
            self.stopped = outcome
            return outcome
        self.remember_children()
        services = self.service_pids()

        start = time.monotonic()
        for sig, timeout in (
            (signal.SIGINT, self.stop_timeout),
            (signal.SIGTERM, 5.0),
            (signal.SIGKILL, 5.0),
        ):
            if self.proc.poll() is not None:
                break
            sent = time.monotonic()
            self.proc.send_signal(sig)
            outcome["signal"] = sig.name
            if sig is signal.SIGINT and services:
                outcome["service_exit_s"] = wait_gone(services[0], timeout)
            try:
                self.proc.wait(max(0.1, timeout - (time.monotonic() - sent)))
            except subprocess.TimeoutExpired:
                continue
            break
        outcome["hub_exit_s"] = time.monotonic() - start
        outcome["returncode"] = self.proc.poll()

        leftovers = self._leftovers()
        outcome["leftovers"] = [f"{pid}: {cmdline_of(pid)}" for pid in leftovers]
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stopped = outcome
        return outcome


def _get(url: str) -> requests.Response | None:
    """``GET url``, or None while nothing listens there (or it hangs)."""
    try:
        return http("GET", url, timeout=2)
    except requests.RequestException:
        return None


def _answers(url: str) -> bool:
    """Whether ``url`` answers 200 right now."""
    response = _get(url)
    return response is not None and response.status_code == 200
