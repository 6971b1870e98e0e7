"""JupyterHub config for a throw-away hub on 127.0.0.1 (see ``localhub.py``).

Not a module to import: ``LocalHub`` runs ``jupyterhub -f`` this file. It reads
the ports, the scratch directory, the admin token and the users from
``LOCALHUB_*`` variables, so two hubs (say JupyterHub 5.5 and 6.1) never share a
port, a database or a secret:

``LOCALHUB_DIR``, ``LOCALHUB_PORT``, ``LOCALHUB_HUB_PORT``,
``LOCALHUB_PROXY_API_PORT``, ``LOCALHUB_ADMIN_TOKEN``
    required
``LOCALHUB_USERS``
    comma-separated hub users (default ``alice,bob``)
``LOCALHUB_FRAGMENT``
    the hub-transfer config fragment to load; default: the checkout's
    ``jupyterhub_config.d/hub_transfer.py``, else where the hub image installs it
``LOCALHUB_SERVICE_POLL_INTERVAL``
    seconds between the hub's checks that the service runs (default: the hub's
    own 30 s), so crash tests need not wait for a restart

The hub-transfer service comes from the admin-facing fragment itself, loaded
the way the README tells admins to, so what runs here is exactly what ships.
"""

import os
import pathlib
import sys

from jupyterhub.spawner import Spawner
from tornado import httpserver, netutil, web

c = get_config()  # type: ignore[name-defined]  # noqa: F821

scratch = pathlib.Path(os.environ["LOCALHUB_DIR"])
users = [u for u in os.environ.get("LOCALHUB_USERS", "alice,bob").split(",") if u]

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = int(os.environ["LOCALHUB_PORT"])
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(os.environ["LOCALHUB_HUB_PORT"])
c.ConfigurableHTTPProxy.api_url = (
    f"http://127.0.0.1:{os.environ['LOCALHUB_PROXY_API_PORT']}"
)
c.ConfigurableHTTPProxy.pid_file = str(scratch / "jupyterhub-proxy.pid")
c.JupyterHub.db_url = f"sqlite:///{scratch / 'jupyterhub.sqlite'}"
# the hub writes a fresh secret (mode 0600) here on its first start
c.JupyterHub.cookie_secret_file = str(scratch / "jupyterhub_cookie_secret")

c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = set(users)

# The caller's own hand on the hub: a service whose token may mint tokens for
# the users and start their servers, and nothing else.
c.JupyterHub.services.append(
    {"name": "localhub-admin", "api_token": os.environ["LOCALHUB_ADMIN_TOKEN"]}
)
c.JupyterHub.load_roles.append(
    {
        "name": "localhub-admin",
        "scopes": [
            scope
            for user in users
            for scope in (
                f"tokens!user={user}",
                f"servers!user={user}",
                f"read:servers!user={user}",
            )
        ],
        "services": ["localhub-admin"],
    }
)


class _Up(web.RequestHandler):
    def get(self, *args):
        self.write("up")


class TokenSpawner(Spawner):
    """A "server" that only keeps the API token the hub created for it.

    The extension authenticates with that token, and what it may do is decided
    when the hub creates it (``server`` role, ``server_token_scopes``, and the
    user's own scopes). Spawning lets callers use the real thing rather than a
    token minted to resemble it. The hub just needs an HTTP answer at the
    server's URL, so a tiny in-process tornado server stands in for Jupyter.
    """

    _http = None

    async def start(self):
        tokens = scratch / "server-tokens"
        tokens.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(
            tokens / self.user.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        with os.fdopen(fd, "w") as f:
            f.write(self.api_token)

        sockets = netutil.bind_sockets(0, "127.0.0.1")
        self._http = httpserver.HTTPServer(web.Application([(r"/(.*)", _Up)]))
        self._http.add_sockets(sockets)
        return ("127.0.0.1", sockets[0].getsockname()[1])

    async def poll(self):
        return None if self._http is not None else 0

    async def stop(self, now=False):
        if self._http is not None:
            self._http.stop()
            self._http = None


c.JupyterHub.spawner_class = TokenSpawner


def _poll_services_every(seconds):
    """Make the hub check its managed services every ``seconds``.

    JupyterHub restarts a managed service that died only when it next polls
    it, every 30 s, and builds the service's spawner without the hub's config,
    so no setting changes that. Replacing the private class the hub builds it
    from does; only crash tests ask for it.
    """
    from jupyterhub.services import service
    from traitlets import default

    class PolledServiceSpawner(service._ServiceSpawner):
        @default("poll_interval")
        def _poll_interval_default(self):
            return seconds

        @default("poll_jitter")
        def _poll_jitter_default(self):
            return 0.0

    service._ServiceSpawner = PolledServiceSpawner


if os.environ.get("LOCALHUB_SERVICE_POLL_INTERVAL"):
    _poll_services_every(int(os.environ["LOCALHUB_SERVICE_POLL_INTERVAL"]))


def _fragment():
    """The config fragment: the one named, the checkout's, else the installed one.

    From a checkout it is two levels above this package, in the same tree as
    the code under test; a hub image built from the Dockerfile has it where
    zero-to-jupyterhub execs ``jupyterhub_config.d/*.py`` from.
    """
    named = os.environ.get("LOCALHUB_FRAGMENT")
    relative = pathlib.Path("jupyterhub_config.d", "hub_transfer.py")
    candidates = (
        [pathlib.Path(named)]
        if named
        else [
            pathlib.Path(__file__).resolve().parents[2] / relative,
            pathlib.Path(sys.prefix, "etc", "jupyterhub") / relative,
            pathlib.Path("/usr/local/etc/jupyterhub") / relative,
        ]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "hub-transfer's config fragment is in none of: "
        + ", ".join(map(str, candidates))
        + " (set LOCALHUB_FRAGMENT)"
    )


load_subconfig(str(_fragment()))  # type: ignore[name-defined]  # noqa: F821
