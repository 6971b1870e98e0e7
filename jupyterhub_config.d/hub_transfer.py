"""JupyterHub config fragment: run hub-transfer as a managed service.

Load it from ``jupyterhub_config.py`` with::

    load_subconfig("/path/to/jupyterhub_config.d/hub_transfer.py")

or drop it into the folder zero-to-jupyterhub execs ``jupyterhub_config.d/*.py``
from. It only ever adds to the admin's configuration, never replaces it, because
a fragment that assigns ``c.JupyterHub.services`` or redefines a role silently
undoes (or, for a role defined twice, stops the hub over) what the admin wrote.

What it adds
------------

1. The managed service ``hub-transfer`` (the name is fixed: the JupyterLab
   extension's submission URL is ``/services/hub-transfer/``). A managed
   service inherits only PATH, LANG and a few more from the hub, so every
   variable the service reads is passed on explicitly, and only when set:
   ``GLOBUS_CLIENT_ID``, ``GLOBUS_CLIENT_SECRET``,
   ``GLOBUS_TRANSFER_SUBMISSION_SCOPE``, ``GLOBUS_COLLECTION_ID`` (or
   ``GLOBUS_LOCAL_ENDPOINT``), every ``GLOBUS_SDK_*`` and ``HUB_TRANSFER_*``
   (``HUB_TRANSFER_CRYPT_KEY``, ``HUB_TRANSFER_DB_URL``...), and the usual
   HTTP proxy and CA bundle variables, without which a hub behind a proxy
   cannot reach Globus. The command is the hub's own ``sys.executable -m
   hub_transfer``, so hub-transfer must be installed next to JupyterHub. The
   proxy reaches it at ``HUB_TRANSFER_URL``, else ``http://127.0.0.1:<port>``
   with the port from ``HUB_TRANSFER_PORT`` (default 10101). On Kubernetes,
   where the proxy runs in its own pod, set ``HUB_TRANSFER_URL`` to
   ``http://hub:10101`` and ``HUB_TRANSFER_BIND_URL`` to
   ``http://0.0.0.0:10101``.

2. Access to the service for every user's single-user server. The extension
   calls us with its server's API token, which holds only the scopes the hub
   requests for a server that its user also holds. Both sides therefore need
   ``access:services!service=hub-transfer``:

   * The user. JupyterHub >= 6 has ``JupyterHub.extra_user_scopes``, which adds
     to the default ``user`` role without redefining it: used there. JupyterHub
     5 has no such option, so the ``user`` role is defined with its one default
     scope, ``self``, plus ours.

   * The server token. ``Spawner.server_token_scopes`` is set to a callable that
     returns the ``server`` role's current scopes, read from the hub database
     at each spawn, plus ours. So the defaults (``users:activity!user``,
     ``access:servers!server`` in both 5.5 and 6.1) and any admin change to the
     ``server`` role survive. Redefining the ``server`` role instead would stop
     a hub whose admin defines it too, and freeze today's defaults in here.

   Where the admin's own settings are visible (zero-to-jupyterhub execs this
   file into the main config object), they are extended rather than
   replaced: a ``user`` role defined in ``load_roles`` gets the scope added
   (on 6 an overridden ``user`` role makes the hub ignore
   ``extra_user_scopes``), and an earlier ``server_token_scopes`` is called
   and extended. Through ``load_subconfig`` the parent's settings are
   invisible, so an admin who defines the ``user`` role (on 5 or 6) or sets
   ``server_token_scopes`` must include the scope there, and, on 5, assign
   ``c.JupyterHub.load_roles`` after loading this file (two ``user`` roles
   stop the hub); a ``server_token_scopes`` set after this file wins over it.

The service itself needs no hub API scopes and no role: it asks the hub who a
token belongs to with that very token (``GET /hub/api/user``), and browser
logins use the OAuth client the hub creates for every managed service.
"""

import os
import sys


def _hub_transfer_configure(c):
    """Add the service and its access to the config object ``c``.

    A function, deleted once called, so that exec-ing this file into a bigger
    config (as zero-to-jupyterhub does) leaves none of its names behind.
    """
    from jupyterhub import version_info

    name = "hub-transfer"
    access = f"access:services!service={name}"

    passed = (
        "GLOBUS_CLIENT_ID",
        "GLOBUS_CLIENT_SECRET",
        "GLOBUS_TRANSFER_SUBMISSION_SCOPE",
        "GLOBUS_COLLECTION_ID",
        "GLOBUS_LOCAL_ENDPOINT",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "REQUESTS_CA_BUNDLE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    )
    environment = {
        key: value
        for key, value in os.environ.items()
        if key in passed or key.startswith(("GLOBUS_SDK_", "HUB_TRANSFER_"))
    }
    port = os.environ.get("HUB_TRANSFER_PORT") or "10101"
    c.JupyterHub.services.append(
        {
            "name": name,
            "command": [sys.executable, "-m", "hub_transfer"],
            "url": os.environ.get("HUB_TRANSFER_URL") or f"http://127.0.0.1:{port}",
            "oauth_no_confirm": True,
            "environment": environment,
        }
    )

    def visible_role(role_name):
        """The admin's definition of a role, when this config object shows it.

        Inside ``load_subconfig`` the list is a fresh lazy value that only
        records our appends, so nothing is found there.
        """
        roles = c.JupyterHub.get("load_roles")
        if isinstance(roles, list):
            for role in roles:
                if isinstance(role, dict) and role.get("name") == role_name:
                    return role
        return None

    # the user must hold the scope, or it is cut from the server's token
    user_role = visible_role("user")
    if user_role is not None:
        scopes = user_role.setdefault("scopes", ["self"])
        if access not in scopes:
            scopes.append(access)
    elif version_info >= (6,):
        extra = c.JupyterHub.extra_user_scopes
        if isinstance(extra, list | tuple):
            c.JupyterHub.extra_user_scopes = {*extra, access}
        else:
            # a set, or the lazy value that adds to whatever else is configured
            extra.add(access)
    else:
        c.JupyterHub.load_roles.append({"name": "user", "scopes": ["self", access]})

    # and the server's token must ask for it, next to the server role's scopes
    earlier = c.Spawner.get("server_token_scopes")

    async def server_token_scopes(spawner):
        """The scopes a server's token is created with: what an earlier
        setting asked for, else (as the hub does) the ``server`` role's, plus
        access to hub-transfer."""
        scopes = earlier(spawner) if callable(earlier) else earlier
        if hasattr(scopes, "__await__"):
            scopes = await scopes
        if not scopes:
            from jupyterhub import orm

            role = orm.Role.find(spawner.user.db, "server")
            scopes = role.scopes if role is not None else []
        return sorted({*scopes, access})

    c.Spawner.server_token_scopes = server_token_scopes


# ``c`` is the config object traitlets (or zero-to-jupyterhub) loads us into;
# get_config() is not used because zero-to-jupyterhub shadows that name
_hub_transfer_configure(c)  # noqa: F821
del _hub_transfer_configure
