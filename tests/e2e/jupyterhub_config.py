"""JupyterHub config for the end-to-end tests: a throw-away hub on 127.0.0.1.

``tests/e2e/conftest.py`` starts ``jupyterhub -f`` this file with the ports, the
scratch directory and the admin token in ``HUB_E2E_*`` variables, so two runs
(say JupyterHub 5.5 and 6.1) never share a port, a database or a secret. The
hub-transfer service comes from the admin-facing fragment itself, loaded the
way the README tells admins to, so the tests exercise exactly what ships.
"""

import os
import pathlib

from jupyterhub.spawner import Spawner
from tornado import httpserver, netutil, web

c = get_config()  # noqa: F821

scratch = pathlib.Path(os.environ["HUB_E2E_DIR"])
repo = pathlib.Path(__file__).resolve().parents[2]

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = int(os.environ["HUB_E2E_PORT"])
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(os.environ["HUB_E2E_HUB_PORT"])
c.ConfigurableHTTPProxy.api_url = (
    f"http://127.0.0.1:{os.environ['HUB_E2E_PROXY_API_PORT']}"
)
c.ConfigurableHTTPProxy.pid_file = str(scratch / "jupyterhub-proxy.pid")
c.JupyterHub.db_url = f"sqlite:///{scratch / 'jupyterhub.sqlite'}"
# the hub writes a fresh secret (mode 0600) here on its first start
c.JupyterHub.cookie_secret_file = str(scratch / "jupyterhub_cookie_secret")

c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {"alice", "bob"}

# The tests' own hand on the hub: a service whose token may mint tokens for the
# test users and start alice's server, and nothing else.
c.JupyterHub.services.append(
    {"name": "e2e-admin", "api_token": os.environ["HUB_E2E_ADMIN_TOKEN"]}
)
c.JupyterHub.load_roles.append(
    {
        "name": "e2e-admin",
        "scopes": [
            "tokens!user=alice",
            "tokens!user=bob",
            "servers!user=alice",
            "read:servers!user=alice",
        ],
        "services": ["e2e-admin"],
    }
)


class _Up(web.RequestHandler):
    def get(self, *args):
        self.write("up")


class TokenSpawner(Spawner):
    """A "server" that only keeps the API token the hub created for it.

    The extension authenticates with that token, and what it may do is decided
    when the hub creates it (``server`` role, ``server_token_scopes``, and the
    user's own scopes). Spawning lets the tests use the real thing rather than
    a token minted to resemble it. The hub just needs an HTTP answer at the
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

load_subconfig(str(repo / "jupyterhub_config.d" / "hub_transfer.py"))  # noqa: F821
