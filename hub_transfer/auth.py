"""Who is calling, according to JupyterHub.

The JupyterLab extension authenticates with its single-user server's hub token
(``Authorization: Bearer ...``); a person in a browser authenticates with the
OAuth cookie this service sets after the hub's login. Both are resolved through
:class:`jupyterhub.services.auth.HubOAuth` on its asynchronous path, so a hub
lookup never blocks the event loop, and its cache spares the hub repeated
questions about the same token.
"""

from __future__ import annotations

import os
import typing as t

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from traitlets import default


class ServiceHubAuth(HubOAuth):
    """HubOAuth that fails closed when the hub did not tell us our scopes.

    Upstream, empty ``access_scopes`` means "allow every hub user and service".
    A service started by hand, or by a hub that predates scopes, would then let
    anybody submit; we require access to this service instead.
    """

    @default("access_scopes")
    def _access_scopes_fail_closed(self) -> set[str]:
        scopes = super()._default_scopes()
        if scopes:
            return scopes
        name = os.environ.get("JUPYTERHUB_SERVICE_NAME", "hub-transfer")
        return {f"access:services!service={name}"}


class OAuthCallbackHandler(HubOAuthCallbackHandler):
    """The hub's OAuth redirect target, with our HubOAuth handed in.

    The upstream handler would otherwise reach for the process-wide singleton.
    """

    def initialize(self, hub_auth: HubOAuth, **_: t.Any) -> None:
        self.hub_auth = hub_auth
