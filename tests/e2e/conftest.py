"""A real JupyterHub, running hub-transfer as its managed service, for e2e tests.

The hub runs as a subprocess (``jupyterhub -f tests/e2e/jupyterhub_config.py``)
from the Python named by ``HUB_PYTHON`` (default: the one running pytest), so
the same tests cover JupyterHub 5.5 and 6.1 by pointing at another venv. The
hub launches the service with its own ``sys.executable``, exactly as in
production, and Globus is the stand-in from ``hub_transfer.testing.standin``.

Every listener is on 127.0.0.1; the hub's and the service's output both go to
one log file (``Hub.log_path``), which tests may grep. Nothing outlives the
session: the hub is stopped with SIGINT, then SIGTERM, then SIGKILL, each
bounded, and any child it leaves behind is killed by its pid.
"""

from __future__ import annotations

import dataclasses
import json
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

import pytest
import requests

from hub_transfer.testing.standin import StandInProcess

HERE = pathlib.Path(__file__).resolve().parent
HUB_CONFIG = HERE / "jupyterhub_config.py"
SERVICE = "hub-transfer"
USERS = ("alice", "bob")

# the hub needs ~2 s to come up (the service ~1 s more); CI machines are slower
START_TIMEOUT = 45.0
# JupyterHub gives a managed service 10 s after SIGINT before SIGTERM
STOP_TIMEOUT = 20.0


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


def hub_python() -> str:
    """The interpreter that runs the hub (and therefore the service)."""
    return os.environ.get("HUB_PYTHON") or sys.executable


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: starts a real JupyterHub and the Globus stand-in"
    )


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (Linux only)."""
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


def _cmdline(pid: int) -> str:
    return " ".join(argv_of(pid))


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; an exited but unreaped child counts as gone."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_gone(pid: int, timeout: float) -> float | None:
    """Seconds until ``pid`` exited, or None if it still runs at ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not _alive(pid):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


@dataclasses.dataclass
class GlobusSetup:
    """The stand-in and what the tests registered there."""

    standin: StandInProcess
    client_id: str
    client_secret: str
    scope: str
    identities: dict[str, dict[str, t.Any]]

    def token(self, user: str, scope: str | None = None) -> str:
        """A Globus token of ``user``'s identity for the service's scope, as the
        JupyterLab extension would hold after the user logged in to Globus."""
        answer = self.standin.issue_token(
            self.identities[user]["id"], scope or self.scope
        )
        return answer["access_token"]


@dataclasses.dataclass
class Hub:
    """A running hub; ``url`` is its public (proxy) address."""

    proc: subprocess.Popen[bytes]
    url: str
    admin_token: str
    log_path: pathlib.Path
    scratch: pathlib.Path
    version: str = ""
    children: dict[int, str] = dataclasses.field(default_factory=dict)
    stopped: dict[str, t.Any] | None = None

    @property
    def service_url(self) -> str:
        return f"{self.url}/services/{SERVICE}/"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def api(self, method: str, path: str, **kwargs: t.Any) -> requests.Response:
        """Call the hub REST API as the tests' admin service."""
        headers = {"Authorization": f"token {self.admin_token}"}
        return http(method, f"{self.url}/hub/api/{path}", headers=headers, **kwargs)

    def mint_token(self, user: str, scopes: list[str]) -> str:
        """A new hub API token of ``user`` holding exactly ``scopes``."""
        response = self.api(
            "POST",
            f"users/{user}/tokens",
            json={"scopes": scopes, "note": "e2e", "expires_in": 3600},
        )
        assert response.status_code == 201, response.text
        return response.json()["token"]

    def server_token(self, user: str) -> str:
        """The API token the hub itself created for ``user``'s server.

        The server is started through the REST API; the test spawner writes the
        token it was given to the scratch directory.
        """
        path = self.scratch / "server-tokens" / user
        if not path.exists():
            response = self.api("POST", f"users/{user}/server")
            assert response.status_code in (201, 202), response.text
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                model = self.api("GET", f"users/{user}").json()
                server = model.get("servers", {}).get("")
                if server and server.get("ready"):
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"{user}'s server did not start:\n{self.log_tail()}")
        return path.read_text()

    def service_pids(self) -> list[int]:
        """The hub's children that run hub-transfer (one, normally)."""
        return [
            pid
            for pid in _children(self.proc.pid)
            if "-m hub_transfer" in _cmdline(pid)
        ]

    def remember_children(self) -> None:
        """Note the hub's children (proxy, service) while it lives, so they can
        be found, and killed, even if the hub dies without stopping them."""
        if self.proc.poll() is None:
            for pid in _children(self.proc.pid):
                self.children[pid] = _cmdline(pid)

    def _leftovers(self) -> list[int]:
        """Our processes still running once the hub is gone.

        A pid counts only while its command line is still the one noted, so a
        reused pid is never killed. The proxy's pid file covers a hub that died
        before its children were noted.
        """
        found = {pid for pid, cmd in self.children.items() if _cmdline(pid) == cmd}
        pid_file = self.scratch / "jupyterhub-proxy.pid"
        port = self.url.rsplit(":", 1)[1]
        try:
            proxy = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            proxy = 0
        cmd = _cmdline(proxy) if proxy else ""
        if "configurable-http-proxy" in cmd and f"--port {port} " in cmd + " ":
            found.add(proxy)
        return sorted(pid for pid in found if _alive(pid))

    def stop(self) -> dict[str, t.Any]:
        """Stop the hub: SIGINT, then SIGTERM, then SIGKILL, each bounded.

        Returns how it went: the hub's exit code, seconds until the service and
        the hub exited after SIGINT, the last signal sent, and what had to be
        killed afterwards. Idempotent: later calls return the first answer.
        """
        if self.stopped is not None:
            return self.stopped
        self.remember_children()
        services = self.service_pids()
        outcome: dict[str, t.Any] = {"signal": None, "service_exit_s": None}

        start = time.monotonic()
        for sig, timeout in (
            (signal.SIGINT, STOP_TIMEOUT),
            (signal.SIGTERM, 5.0),
            (signal.SIGKILL, 5.0),
        ):
            if self.proc.poll() is not None:
                break
            sent = time.monotonic()
            self.proc.send_signal(sig)
            outcome["signal"] = sig.name
            if sig is signal.SIGINT and services:
                outcome["service_exit_s"] = _wait_gone(services[0], timeout)
            try:
                self.proc.wait(max(0.1, timeout - (time.monotonic() - sent)))
            except subprocess.TimeoutExpired:
                continue
            break
        outcome["hub_exit_s"] = time.monotonic() - start
        outcome["returncode"] = self.proc.poll()

        leftovers = self._leftovers()
        outcome["leftovers"] = [f"{pid}: {_cmdline(pid)}" for pid in leftovers]
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stopped = outcome
        return outcome


@pytest.fixture(scope="session")
def hub_globus() -> t.Iterator[GlobusSetup]:
    """The Globus stand-in with the service's client and two users' identities."""
    standin = StandInProcess()
    standin.start()
    try:
        client = standin.create_client(name="hub-transfer e2e")
        identities = {
            user: standin.create_identity(f"{user}@example.org") for user in USERS
        }
        yield GlobusSetup(
            standin=standin,
            client_id=client["client_id"],
            client_secret=client["client_secret"],
            scope=client["scope"],
            identities=identities,
        )
    finally:
        standin.stop()


def _hub_env(globus: GlobusSetup, scratch: pathlib.Path) -> dict[str, str]:
    """The hub's environment: ours, minus anything that could leak in from the
    developer's shell (real Globus settings, proxies), plus the test's."""
    drop = ("GLOBUS_", "HUB_TRANSFER_", "HUB_E2E_", "JUPYTERHUB_", "CONFIGPROXY_")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(drop) and not key.lower().endswith("_proxy")
    }
    # run the hub's venv first on PATH, as its own `jupyterhub` would
    bin_dir = str(pathlib.Path(hub_python()).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.pop("VIRTUAL_ENV", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(globus.standin.env())
    service, proxy, hub, proxy_api = free_ports(4)
    env.update(
        {
            "GLOBUS_CLIENT_ID": globus.client_id,
            "GLOBUS_CLIENT_SECRET": globus.client_secret,
            "GLOBUS_TRANSFER_SUBMISSION_SCOPE": globus.scope,
            "HUB_TRANSFER_PORT": str(service),
            "HUB_E2E_DIR": str(scratch),
            "HUB_E2E_PORT": str(proxy),
            "HUB_E2E_HUB_PORT": str(hub),
            "HUB_E2E_PROXY_API_PORT": str(proxy_api),
            "HUB_E2E_ADMIN_TOKEN": secrets.token_hex(32),
        }
    )
    return env


def _wait_until_up(hub: Hub, env: dict[str, str]) -> None:
    """Poll, bounded, until the hub API answers on its own port, the service on
    its own, and then the service through the proxy (its route comes last).

    Asking the proxy early would only fill the log with its 404s and its failed
    attempts to fetch the hub's error page.
    """
    deadline = time.monotonic() + START_TIMEOUT
    health = f"/services/{SERVICE}/api/health"
    steps = [
        ("the hub API", f"http://127.0.0.1:{env['HUB_E2E_HUB_PORT']}/hub/api/"),
        ("the service", f"http://127.0.0.1:{env['HUB_TRANSFER_PORT']}{health}"),
        ("the service through the proxy", hub.url + health),
    ]
    while steps and time.monotonic() < deadline:
        if hub.proc.poll() is not None:
            pytest.fail(
                f"jupyterhub exited with {hub.proc.returncode} while starting; "
                f"log tail:\n{hub.log_tail()}"
            )
        hub.remember_children()
        what, url = steps[0]
        try:
            response = http("GET", url, timeout=2)
        except requests.RequestException:
            response = None
        if response is not None and response.status_code == 200:
            if what == "the hub API":
                hub.version = response.json()["version"]
            steps.pop(0)
            continue
        time.sleep(0.1)
    if steps:
        pytest.fail(
            f"{steps[0][0]} did not answer within {START_TIMEOUT:.0f} s; "
            f"log tail:\n{hub.log_tail()}"
        )


@pytest.fixture(scope="session")
def hub(
    hub_globus: GlobusSetup, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[Hub]:
    """JupyterHub with hub-transfer loaded from the shipped config fragment."""
    scratch = tmp_path_factory.mktemp("hub")
    env = _hub_env(hub_globus, scratch)
    if shutil.which("configurable-http-proxy", path=env["PATH"]) is None:
        pytest.skip("configurable-http-proxy is not on PATH (npm i -g it)")
    log_path = scratch / "hub.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [hub_python(), "-m", "jupyterhub", "-f", str(HUB_CONFIG)],
            cwd=scratch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Hub(
        proc=proc,
        url=f"http://127.0.0.1:{env['HUB_E2E_PORT']}",
        admin_token=env["HUB_E2E_ADMIN_TOKEN"],
        log_path=log_path,
        scratch=scratch,
    )
    try:
        _wait_until_up(running, env)
        yield running
    finally:
        outcome = running.stop()
        if outcome["leftovers"]:
            print("killed what the hub left running:", json.dumps(outcome))


@pytest.fixture(scope="session")
def hub_log_path(hub: Hub) -> pathlib.Path:
    """Where the hub's and the service's output go (for log-content tests)."""
    return hub.log_path
