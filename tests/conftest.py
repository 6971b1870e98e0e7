"""Fixtures for the in-process tests.

- ``hub_users``: hub tokens the fake hub knows, mapped to their user models
- ``fake_hub_auth``: HubOAuth that answers from ``hub_users`` instead of a hub
- ``submitter``: a TransferSubmitter whose Globus calls are recorded fakes
- ``hub_app`` / ``app``: the service's HubTransferApp and its Tornado app
- ``api``: a small helper that posts to the service and decodes JSON
"""

from __future__ import annotations

import copy
import json
import typing as t

import pytest
from traitlets import Dict

from hub_transfer.app import HubTransferApp
from hub_transfer.auth import ServiceHubAuth
from hub_transfer.errors import ServiceError
from hub_transfer.globus import GlobusUser, TransferSubmitter, UserCredential
from hub_transfer.model import TransferDocument
from hub_transfer.testing.documents import extension_body

SERVICE_SCOPE = "access:services!service=hub-transfer"
PREFIX = "/services/hub-transfer/"
SOURCE = "ddb59aef-6d04-11e5-ba46-22000b92c6ec"
DESTINATION = "ddb59af0-6d04-11e5-ba46-22000b92c6ec"


class FakeHubAuth(ServiceHubAuth):
    """Answers token lookups from a dict, on the same async path as the hub."""

    users = Dict()

    def user_for_token(self, token, use_cache=True, session_id="", *, sync=True):
        async def lookup() -> dict[str, t.Any] | None:
            model = self.users.get(token)
            return copy.deepcopy(model) if model else None

        assert not sync, "the service must use HubAuth's async path"
        return lookup()


class FakeSubmitter(TransferSubmitter):
    """Records what the handlers ask of Globus and answers from fixed rules.

    Tokens starting with ``good`` are active; ``expired`` tokens fail as Globus
    introspection would. ``fail_submit`` makes the next submit raise.
    """

    def __init__(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        self.submitted: list[tuple[GlobusUser, TransferDocument]] = []
        self.fail_submit: ServiceError | None = None

    async def authenticate(self, token: str) -> GlobusUser:
        if token.startswith("expired"):
            raise ServiceError(401, "globus_token_expired", "The token has expired.")
        if not token.startswith("good"):
            raise ServiceError(401, "globus_token_inactive", "Not active.")
        return GlobusUser(
            identity_id="11111111-2222-3333-4444-555555555555",
            username="alice@example.org",
            identity_set=("11111111-2222-3333-4444-555555555555",),
            scopes=frozenset({"scope"}),
            expires_at=4e9,
            token_hash="abc",
        )

    async def user_credential(self, token, user):
        return UserCredential("transfer-token", None, 4e9)

    async def submit(self, credential, user, document):
        if self.fail_submit:
            raise self.fail_submit
        self.submitted.append((user, document))
        return {
            "task_id": f"task-{len(self.submitted)}",
            "submission_id": "sub-1",
            "code": "Accepted",
            "message": "The transfer has been accepted",
            "request_id": "req-1",
        }


@pytest.fixture
def hub_users() -> dict[str, dict[str, t.Any]]:
    return {
        "alice-server-token": {
            "kind": "user",
            "name": "alice",
            "admin": False,
            "groups": [],
            "scopes": [SERVICE_SCOPE, "users:activity!user=alice"],
        },
        "bob-no-access": {
            "kind": "user",
            "name": "bob",
            "admin": False,
            "groups": [],
            "scopes": ["read:users:name!user=bob"],
        },
    }


@pytest.fixture
def fake_hub_auth(hub_users) -> FakeHubAuth:
    return FakeHubAuth(
        users=hub_users,
        access_scopes={SERVICE_SCOPE},
        api_token="unused",
        api_url="http://127.0.0.1:1/hub/api",
    )


@pytest.fixture
def submitter() -> t.Iterator[FakeSubmitter]:
    fake = FakeSubmitter(
        client_id="client", client_secret="secret", required_scope="scope"
    )
    yield fake
    fake.close()


@pytest.fixture
def hub_app(fake_hub_auth, submitter) -> HubTransferApp:
    app = HubTransferApp(
        hub_auth=fake_hub_auth, submitter=submitter, service_prefix=PREFIX
    )
    app.init_submitter()
    app.init_tornado()
    return app


@pytest.fixture
def app(hub_app):
    return hub_app.tornado_app


class Api:
    """Posts to the service in-process and returns (status, JSON body)."""

    def __init__(self, client: t.Any) -> None:
        self.client = client

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "alice-server-token",
        body: t.Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, t.Any, t.Any]:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        if raw is None and body is not None:
            raw = json.dumps(body).encode()
        response = await self.client.fetch(
            PREFIX + path,
            method=method,
            headers=all_headers,
            body=raw if method in ("POST", "PUT") else None,
            raise_error=False,
            follow_redirects=False,
        )
        is_json = "json" in response.headers.get("Content-Type", "")
        data = json.loads(response.body) if response.body and is_json else None
        return response.code, data, response

    async def submit(self, body: t.Any = None, **kwargs: t.Any):
        return await self.request("POST", "", body=body, **kwargs)


@pytest.fixture
def api(http_server_client) -> Api:
    return Api(http_server_client)


def transfer_body(**overrides: t.Any) -> dict[str, t.Any]:
    """The document the JupyterLab extension sends, with optional changes."""
    body = extension_body(
        "good-globus-token",
        source=SOURCE,
        destination=DESTINATION,
        label="from JupyterLab",
    )
    body["transfer"].update(overrides)
    return body
