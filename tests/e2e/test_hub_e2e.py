"""hub-transfer behind a real JupyterHub, as the JupyterLab extension uses it.

Everything goes through the hub's proxy with the token the hub itself gave a
user's server, so these tests fail if the shipped config fragment does not
grant servers access to the service, or if the hub and the service disagree on
URLs, headers or auth. The last test stops the hub and must stay last.
"""

from __future__ import annotations

import typing as t
import uuid

import pytest
import requests

from hub_transfer.testing.documents import extension_body

from .conftest import GlobusSetup, Hub, argv_of, http, hub_python

pytestmark = pytest.mark.e2e

SOURCE = str(uuid.UUID(int=0x5EED_0001))
DESTINATION = str(uuid.UUID(int=0x5EED_0002))
ACCESS_SCOPE = "access:services!service=hub-transfer"


def extension_document(globus_token: str, label: str = "e2e") -> dict[str, t.Any]:
    """The body the Globus JupyterLab extension POSTs, field for field."""
    return extension_body(
        globus_token, source=SOURCE, destination=DESTINATION, label=label
    )


def post(url: str, token: str | None, body: t.Any) -> requests.Response:
    """POST JSON without cookies, as the extension's server-side call does."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http("POST", url, json=body, headers=headers, timeout=30)


def recorded_task(globus: GlobusSetup, task_id: str) -> dict[str, t.Any]:
    tasks = [task for task in globus.standin.tasks() if task["task_id"] == task_id]
    assert len(tasks) == 1, f"stand-in has no single task {task_id}"
    return tasks[0]


def items(task: dict[str, t.Any]) -> list[tuple[str, str, bool]]:
    return [
        (item["source_path"], item["destination_path"], item["recursive"])
        for item in task["DATA"]
    ]


@pytest.fixture(scope="module")
def alice_server_token(hub: Hub) -> str:
    return hub.server_token("alice")


def test_health_through_the_proxy(hub: Hub) -> None:
    response = http("GET", f"{hub.service_url}api/health")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["status"] == "ok"


def test_server_token_keeps_the_server_role_and_gains_access(
    hub: Hub, alice_server_token: str
) -> None:
    """The fragment adds the service scope without dropping the defaults."""
    response = http(
        "GET",
        f"{hub.url}/hub/api/user",
        headers={"Authorization": f"token {alice_server_token}"},
    )
    assert response.status_code == 200, response.text
    scopes = set(response.json()["scopes"])
    assert ACCESS_SCOPE in scopes
    assert "users:activity!user=alice" in scopes
    assert "access:servers!server=alice/" in scopes


def test_service_runs_with_the_hubs_python(hub: Hub) -> None:
    """The fragment launches ``sys.executable -m hub_transfer``: the hub's own
    interpreter, so HUB_PYTHON selects the service's environment too."""
    services = hub.service_pids()
    assert len(services) == 1, "expected one hub-transfer process under the hub"
    assert argv_of(services[0]) == [hub_python(), "-m", "hub_transfer"]


@pytest.mark.parametrize("path", ["", "api/transfers"])
def test_extension_document_is_submitted_as_the_user(
    hub: Hub, hub_globus: GlobusSetup, alice_server_token: str, path: str
) -> None:
    document = extension_document(hub_globus.token("alice"))
    response = post(hub.service_url + path, alice_server_token, document)

    assert response.status_code == 201, response.text
    task_id = response.json()["task_id"]
    task = recorded_task(hub_globus, task_id)
    assert task["owner_id"] == hub_globus.identities["alice"]["id"]
    assert task["label"] == "e2e"
    assert task["source_endpoint_id"] == SOURCE
    assert task["destination_endpoint_id"] == DESTINATION
    assert items(task) == [
        ("/share/godata/file1.txt", "~/", False),
        ("/foo/bar", "~/bar", True),
    ]


def test_seed_destination_alias(
    hub: Hub, hub_globus: GlobusSetup, alice_server_token: str
) -> None:
    """The seed's example writes ``destination``; it means destination_path."""
    document = extension_document(hub_globus.token("alice"), label="alias")
    document["transfer"]["DATA"] = [
        {"source_path": "/share/godata/file2.txt", "destination": "~/file2.txt"}
    ]
    response = post(hub.service_url, alice_server_token, document)

    assert response.status_code == 201, response.text
    task = recorded_task(hub_globus, response.json()["task_id"])
    assert items(task) == [("/share/godata/file2.txt", "~/file2.txt", False)]


@pytest.mark.parametrize("with_token", [True, False])
def test_oversized_body_is_json_413_through_the_proxy(
    hub: Hub, hub_globus: GlobusSetup, alice_server_token: str, with_token: bool
) -> None:
    """A refusal must reach the caller as our JSON, not as the proxy's HTML 503
    for a connection closed while the body was still being sent."""
    document = extension_document(hub_globus.token("alice"))
    document["padding"] = "x" * (1536 * 1024)
    for _ in range(5):
        response = post(
            hub.service_url, alice_server_token if with_token else None, document
        )
        assert response.status_code == (413 if with_token else 401), response.text
        assert response.json()["error"] in ("body_too_large", "hub_auth_required")


def test_no_hub_token_is_401(hub: Hub, hub_globus: GlobusSetup) -> None:
    response = post(
        hub.service_url, None, extension_document(hub_globus.token("alice"))
    )
    assert response.status_code == 401
    assert response.json()["error"] == "hub_auth_required"


def test_unknown_hub_token_is_401(hub: Hub, hub_globus: GlobusSetup) -> None:
    document = extension_document(hub_globus.token("alice"))
    response = post(hub.service_url, "not-a-hub-token-" + uuid.uuid4().hex, document)
    assert response.status_code == 401
    assert response.json()["error"] == "hub_auth_required"


def test_token_without_service_access_is_403(hub: Hub, hub_globus: GlobusSetup) -> None:
    """A valid hub token that lacks access to the service is refused."""
    token = hub.mint_token("bob", ["read:users:name!user"])
    before = len(hub_globus.standin.tasks())
    response = post(
        hub.service_url + "api/transfers",
        token,
        extension_document(hub_globus.token("bob")),
    )

    assert response.status_code == 403, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"] == "hub_access_denied"
    assert len(hub_globus.standin.tasks()) == before


def test_cookieless_token_post_needs_no_xsrf(
    hub: Hub, hub_globus: GlobusSetup, alice_server_token: str
) -> None:
    """A token-authenticated API call carries no cookie and no _xsrf, and a
    browser-like Origin must not change that."""
    response = http(
        "POST",
        hub.service_url + "api/transfers",
        json=extension_document(hub_globus.token("alice"), label="no-xsrf"),
        headers={
            "Authorization": f"Bearer {alice_server_token}",
            "Origin": "http://127.0.0.1:1",
            "Sec-Fetch-Mode": "cors",
        },
        timeout=30,
    )
    assert response.status_code == 201, response.text
    assert "xsrf" not in response.text.lower()


def test_unauthenticated_get_of_the_root_is_no_server_error(hub: Hub) -> None:
    response = http("GET", hub.service_url)
    assert response.status_code in (302, 401, 403), response.text
    if response.status_code == 302:
        # a browser is sent to the hub's OAuth login for this service
        assert "/hub/api/oauth2/authorize" in response.headers["Location"]


def test_hub_stops_cleanly_and_takes_the_service_along(
    hub: Hub, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs last: SIGINT to the hub must stop the service within seconds."""
    services = hub.service_pids()
    assert len(services) == 1, "expected one hub-transfer process under the hub"

    outcome = hub.stop()
    service_exit = outcome["service_exit_s"]
    with capsys.disabled():
        print(
            f"\n[e2e] JupyterHub {hub.version}: after SIGINT the service exited "
            f"in {'(never)' if service_exit is None else f'{service_exit:.2f}s'}, "
            f"the hub in {outcome['hub_exit_s']:.2f}s (exit code "
            f"{outcome['returncode']}, last signal {outcome['signal']})"
        )
    assert outcome["signal"] == "SIGINT", outcome
    assert outcome["returncode"] == 0, outcome
    assert outcome["service_exit_s"] is not None, outcome
    assert outcome["service_exit_s"] < 5, outcome
    assert not outcome["leftovers"], outcome
    log = hub.log_path.read_text()
    assert "hub-transfer stopped" in log
    assert "Traceback" not in log
