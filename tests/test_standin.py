"""The Globus stand-in, driven by the real globus-sdk over real HTTP.

These tests pin down that the stand-in answers what globus-sdk v4 sends in
the shapes it expects, so hub_transfer's own tests can rely on it.
"""

from __future__ import annotations

import json
import logging
import typing as t
import uuid

import globus_sdk
import pytest
from globus_sdk.transport import RetryConfig

from hub_transfer.testing.standin import (
    TRANSFER_RESOURCE_SERVER,
    TRANSFER_SCOPE,
    StandInControlError,
    StandInProcess,
    StandInState,
    StandInThread,
    main,
)

log = logging.getLogger(__name__)

SOURCE = "6c4f7b9e-0c1e-4a0b-8d7e-3f9a1c2b4d51"
DESTINATION = "a1b2c3d4-5e6f-4a8b-9c0d-112233445566"


@pytest.fixture(scope="module")
def standin() -> t.Iterator[StandInProcess]:
    """One subprocess for the module: starting Python costs more than a reset."""
    with StandInProcess() as process:
        yield process


@pytest.fixture(autouse=True)
def fresh(standin: StandInProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty stand-in per test, and globus-sdk pointed at it."""
    standin.reset()
    for name, value in standin.env().items():
        monkeypatch.setenv(name, value)


def no_retry() -> RetryConfig:
    # Faults must surface on the first answer, not after SDK retries.
    return RetryConfig(max_retries=0)


def auth_client(client: dict[str, t.Any]) -> globus_sdk.ConfidentialAppAuthClient:
    return globus_sdk.ConfidentialAppAuthClient(
        client["client_id"], client["client_secret"], retry_config=no_retry()
    )


def transfer_client(token: str) -> globus_sdk.TransferClient:
    return globus_sdk.TransferClient(
        authorizer=globus_sdk.AccessTokenAuthorizer(token), retry_config=no_retry()
    )


def user_transfer_token(
    standin: StandInProcess, username: str = "alice@example.org"
) -> tuple[str, dict[str, t.Any]]:
    """The hub's path to a Transfer token: user token -> dependent token."""
    hub = standin.create_client()
    user = standin.create_identity(username)
    upstream = standin.issue_token(user["id"], client_id=hub["client_id"])

    tokens = auth_client(hub).oauth2_get_dependent_tokens(upstream["access_token"])
    return tokens.by_resource_server[TRANSFER_RESOURCE_SERVER]["access_token"], user


def transfer_data(**options: t.Any) -> globus_sdk.TransferData:
    data = globus_sdk.TransferData(
        source_endpoint=SOURCE, destination_endpoint=DESTINATION, **options
    )
    data.add_item("/home/alice/results/", "/project/results/", recursive=True)
    data.add_item("/home/alice/notes.txt", "/project/notes.txt")
    return data


def test_introspect_and_dependent_tokens(standin: StandInProcess) -> None:
    hub = standin.create_client()
    alice = standin.create_identity("alice@example.org")
    upstream = standin.issue_token(alice["id"], client_id=hub["client_id"])
    auth = auth_client(hub)

    info = auth.oauth2_token_introspect(
        upstream["access_token"], include="identity_set"
    )
    assert info["active"] is True
    assert info["sub"] == alice["id"]
    assert info["username"] == "alice@example.org"
    assert info["scope"] == hub["scope"]
    assert info["identity_set"] == [alice["id"]]
    assert hub["client_id"] in info["aud"]
    assert info["iss"] == "https://auth.globus.org"
    assert info["exp"] > info["iat"]

    tokens = auth.oauth2_get_dependent_tokens(
        upstream["access_token"], refresh_tokens=True
    )
    transfer = tokens.by_resource_server[TRANSFER_RESOURCE_SERVER]
    assert transfer["scope"] == TRANSFER_SCOPE
    assert transfer["access_token"] and transfer["refresh_token"]
    assert transfer["expires_at_seconds"] > 0

    calls = standin.calls()
    assert [c["operation"] for c in calls] == ["introspect", "dependent_token"]
    assert all(c["status"] == 200 for c in calls)
    assert calls[0]["client_id"] == hub["client_id"]
    logged = json.dumps(calls)
    assert upstream["access_token"] not in logged
    assert transfer["access_token"] not in logged


def test_introspection_hidden_from_other_clients(standin: StandInProcess) -> None:
    hub = standin.create_client()
    other = standin.create_client()
    alice = standin.create_identity("alice@example.org")
    upstream = standin.issue_token(alice["id"], client_id=hub["client_id"])

    result = auth_client(other).oauth2_token_introspect(upstream["access_token"])
    assert result.data == {"active": False}

    with pytest.raises(globus_sdk.AuthAPIError) as caught:
        auth_client(other).oauth2_get_dependent_tokens(upstream["access_token"])
    assert caught.value.http_status == 400
    assert caught.value.raw_json is not None
    assert caught.value.raw_json["error"] == "invalid_grant"

    wrong_secret = {**hub, "client_secret": "not-the-secret"}
    with pytest.raises(globus_sdk.AuthAPIError) as caught:
        auth_client(wrong_secret).oauth2_token_introspect(upstream["access_token"])
    assert caught.value.http_status == 401
    assert caught.value.raw_json is not None
    assert caught.value.raw_json["error"] == "invalid_client"


def test_expired_and_revoked_tokens_are_inactive(standin: StandInProcess) -> None:
    hub = standin.create_client()
    alice = standin.create_identity("alice@example.org")
    expired = standin.issue_token(alice["id"], client_id=hub["client_id"], expires_in=0)
    revoked = standin.issue_token(alice["id"], client_id=hub["client_id"])
    standin.revoke_token(revoked["access_token"])
    auth = auth_client(hub)

    assert auth.oauth2_token_introspect(expired["access_token"])["active"] is False
    assert auth.oauth2_token_introspect(revoked["access_token"])["active"] is False
    with pytest.raises(globus_sdk.AuthAPIError) as caught:
        auth.oauth2_get_dependent_tokens(expired["access_token"])
    assert caught.value.code == "INVALID_GRANT"

    later = standin.issue_token(alice["id"], client_id=hub["client_id"])
    standin.advance_clock(200_000)
    assert auth.oauth2_token_introspect(later["access_token"])["active"] is False


def test_refresh_token_grant(standin: StandInProcess) -> None:
    hub = standin.create_client()
    alice = standin.create_identity("alice@example.org")
    upstream = standin.issue_token(alice["id"], client_id=hub["client_id"])
    auth = auth_client(hub)
    dependent = auth.oauth2_get_dependent_tokens(
        upstream["access_token"], refresh_tokens=True
    ).by_resource_server[TRANSFER_RESOURCE_SERVER]

    refreshed = auth.oauth2_refresh_token(dependent["refresh_token"])
    token = refreshed.by_resource_server[TRANSFER_RESOURCE_SERVER]["access_token"]
    assert token != dependent["access_token"]
    assert transfer_client(token).get_submission_id()["value"]

    assert standin.token_info(token)["identity_id"] == alice["id"]
    standin.revoke_token(dependent["refresh_token"])
    with pytest.raises(globus_sdk.AuthAPIError) as caught:
        auth.oauth2_refresh_token(dependent["refresh_token"])
    assert caught.value.http_status == 400


def test_submit_get_and_list_tasks(standin: StandInProcess) -> None:
    token, alice = user_transfer_token(standin)
    tc = transfer_client(token)

    result = tc.submit_transfer(transfer_data(label="hub export"))
    assert result.http_status == 202
    assert result["code"] == "Accepted"
    assert result["DATA_TYPE"] == "transfer_result"
    assert result["request_id"] and result["resource"] == "/transfer"
    task_id = result["task_id"]

    task = tc.get_task(task_id)
    assert task["status"] == "ACTIVE"
    assert task["owner_id"] == alice["id"]
    assert task["label"] == "hub export"
    assert task["source_endpoint_id"] == SOURCE
    assert (task["files"], task["directories"]) == (1, 1)

    listed = tc.task_list(filter={"task_id": [task_id], "status": ["ACTIVE"]})
    assert [doc["task_id"] for doc in listed] == [task_id]
    assert listed["total"] == 1

    standin.set_task_status(task_id, "SUCCEEDED")
    assert tc.get_task(task_id)["completion_time"] is not None
    assert list(tc.task_list(filter=f"task_id:{task_id}/status:ACTIVE")) == []

    (recorded,) = standin.tasks()
    assert recorded["owner_id"] == alice["id"]
    assert recorded["DATA"][0]["source_path"] == "/home/alice/results/"
    assert recorded["DATA"][0]["recursive"] is True
    operations = [c["operation"] for c in standin.calls()]
    assert operations.count("submission_id") == 1
    assert "submit_transfer" in operations


def test_resubmission_with_same_submission_id_is_idempotent(
    standin: StandInProcess,
) -> None:
    token, _ = user_transfer_token(standin)
    tc = transfer_client(token)
    submission_id = tc.get_submission_id()["value"]

    first = tc.submit_transfer(transfer_data(submission_id=submission_id))
    second = tc.submit_transfer(transfer_data(submission_id=submission_id))

    assert first["code"] == "Accepted"
    assert second["code"] == "Duplicate"
    assert second["task_id"] == first["task_id"]
    assert len(standin.tasks()) == 1


def test_tasks_are_private_to_their_owner(standin: StandInProcess) -> None:
    alice_token, _ = user_transfer_token(standin)
    task_id = transfer_client(alice_token).submit_transfer(transfer_data())["task_id"]

    bob = standin.create_identity("bob@example.org")
    bob_token = standin.issue_token(bob["id"], TRANSFER_SCOPE)["access_token"]
    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        transfer_client(bob_token).get_task(task_id)
    assert caught.value.http_status == 404
    assert caught.value.code == "TaskNotFound"
    assert list(transfer_client(bob_token).task_list()) == []


def test_invalid_submissions_are_rejected(standin: StandInProcess) -> None:
    token, _ = user_transfer_token(standin)
    tc = transfer_client(token)

    empty = globus_sdk.TransferData(SOURCE, DESTINATION)
    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        tc.submit_transfer(empty)
    assert (caught.value.http_status, caught.value.code) == (
        400,
        "ClientError.BadRequest",
    )

    unknown_id = transfer_data(submission_id=str(uuid.uuid4()))
    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        tc.submit_transfer(unknown_id)
    assert caught.value.http_status == 400
    assert standin.tasks() == []


def test_transfer_requires_a_transfer_token(standin: StandInProcess) -> None:
    hub = standin.create_client()
    alice = standin.create_identity("alice@example.org")
    hub_scoped = standin.issue_token(alice["id"], client_id=hub["client_id"])

    for token in ("not-a-token", hub_scoped["access_token"]):
        with pytest.raises(globus_sdk.TransferAPIError) as caught:
            transfer_client(token).get_submission_id()
        assert caught.value.http_status == 401
        assert caught.value.code == "AuthenticationFailed"
        assert caught.value.request_id


def test_consent_required(standin: StandInProcess) -> None:
    token, alice = user_transfer_token(standin)
    standin.set_consent_required(alice["id"], True)

    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        transfer_client(token).submit_transfer(transfer_data())
    err = caught.value
    assert err.http_status == 403
    assert err.code == "ConsentRequired"
    assert err.info.consent_required
    assert any(DESTINATION in s for s in err.info.consent_required.required_scopes)
    assert err.info.authorization_parameters
    assert standin.tasks() == []


def test_acl_rules_managed_by_access_manager_client(standin: StandInProcess) -> None:
    manager = standin.create_client(access_manager_of=[DESTINATION])
    outsider = standin.create_client()
    alice = standin.create_identity("alice@example.org")
    tokens = auth_client(manager).oauth2_client_credentials_tokens(TRANSFER_SCOPE)
    tc = transfer_client(
        tokens.by_resource_server[TRANSFER_RESOURCE_SERVER]["access_token"]
    )
    rule = {
        "DATA_TYPE": "access",
        "principal_type": "identity",
        "principal": alice["id"],
        "path": "/project/alice/",
        "permissions": "rw",
    }

    created = tc.add_endpoint_acl_rule(DESTINATION, rule)
    assert created.http_status == 201
    assert created["code"] == "Created"
    rule_id = created["access_id"]
    assert tc.get_endpoint_acl_rule(DESTINATION, rule_id)["path"] == "/project/alice/"
    listed = tc.endpoint_acl_list(DESTINATION)
    assert [r["id"] for r in listed] == [rule_id]
    assert listed["endpoint"] == DESTINATION

    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        tc.add_endpoint_acl_rule(DESTINATION, rule)
    assert (caught.value.http_status, caught.value.code) == (409, "Exists")

    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        tc.add_endpoint_acl_rule(DESTINATION, {**rule, "path": "/no/slash"})
    assert caught.value.http_status == 400

    assert tc.delete_endpoint_acl_rule(DESTINATION, rule_id)["code"] == "Deleted"
    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        tc.delete_endpoint_acl_rule(DESTINATION, rule_id)
    assert caught.value.code == "AccessRuleNotFound"

    other = auth_client(outsider).oauth2_client_credentials_tokens(TRANSFER_SCOPE)
    other_tc = transfer_client(
        other.by_resource_server[TRANSFER_RESOURCE_SERVER]["access_token"]
    )
    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        other_tc.endpoint_acl_list(DESTINATION)
    assert (caught.value.http_status, caught.value.code) == (403, "PermissionDenied")


def test_planted_rule_conflicts_and_rule_cap(standin: StandInProcess) -> None:
    manager = standin.create_client(access_manager_of=[DESTINATION])
    alice = standin.create_identity("alice@example.org")
    planted = standin.plant_acl_rule(DESTINATION, alice["id"], "/shared/", "r")
    tokens = auth_client(manager).oauth2_client_credentials_tokens(TRANSFER_SCOPE)
    tc = transfer_client(
        tokens.by_resource_server[TRANSFER_RESOURCE_SERVER]["access_token"]
    )

    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        tc.add_endpoint_acl_rule(
            DESTINATION,
            {
                "DATA_TYPE": "access",
                "principal_type": "identity",
                "principal": alice["id"],
                "path": "/shared/",
                "permissions": "r",
            },
        )
    assert caught.value.code == "Exists"
    assert [r["id"] for r in tc.endpoint_acl_list(DESTINATION)] == [planted["id"]]

    standin.configure(acl_limit=1)
    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        tc.add_endpoint_acl_rule(
            DESTINATION,
            {
                "DATA_TYPE": "access",
                "principal_type": "identity",
                "principal": alice["id"],
                "path": "/other/",
                "permissions": "r",
            },
        )
    assert (caught.value.http_status, caught.value.code) == (409, "LimitExceeded")
    assert len(standin.acl_rules(DESTINATION)) == 1


def test_injected_faults(standin: StandInProcess) -> None:
    token, _ = user_transfer_token(standin)
    tc = transfer_client(token)
    submission_id = tc.get_submission_id()["value"]
    standin.add_fault("submit_transfer", 503, count=1)

    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        tc.submit_transfer(transfer_data(submission_id=submission_id))
    assert caught.value.http_status == 503
    assert caught.value.code == "ServiceUnavailable"
    assert standin.tasks() == []

    accepted = tc.submit_transfer(transfer_data(submission_id=submission_id))
    assert accepted["code"] == "Accepted"

    standin.add_fault("get_task", 429, code="RateLimited", count=1)
    with pytest.raises(globus_sdk.TransferAPIError) as caught:
        tc.get_task(accepted["task_id"])
    assert (caught.value.http_status, caught.value.code) == (429, "RateLimited")

    standin.add_fault("get_task", drop=True, count=1)
    with pytest.raises(globus_sdk.NetworkError):
        tc.get_task(accepted["task_id"])

    submits = standin.calls("submit_transfer")
    assert [c["status"] for c in submits] == [503, 202]
    assert submits[0]["fault"] is not None
    dropped = standin.calls("get_task")[-1]
    assert dropped["dropped"] is True and dropped["status"] is None


def test_auth_fault_and_fault_cleanup(standin: StandInProcess) -> None:
    hub = standin.create_client()
    standin.add_fault("auth", 500)

    with pytest.raises(globus_sdk.AuthAPIError) as caught:
        auth_client(hub).oauth2_token_introspect("whatever")
    assert caught.value.http_status == 500

    standin.clear_faults()
    assert auth_client(hub).oauth2_token_introspect("whatever")["active"] is False


def test_control_api_rejects_mistakes(standin: StandInProcess) -> None:
    with pytest.raises(StandInControlError) as caught:
        standin.add_fault("no_such_operation", 500)
    assert caught.value.status == 400

    with pytest.raises(StandInControlError) as caught:
        standin.set_task_status(str(uuid.uuid4()), "SUCCEEDED")
    assert caught.value.status == 404


def test_seeded_client_survives_reset(tmp_path: t.Any) -> None:
    state_file = tmp_path / "standin.json"
    seeded = StandInProcess(
        seed_client_id=str(uuid.uuid4()),
        seed_access_manager_of=[DESTINATION],
        state_file=state_file,
    )
    with seeded:
        written = json.loads(state_file.read_text())
        assert written["url"] == seeded.url
        assert seeded.seed_client is not None
        assert (
            written["seed_client"]["client_secret"]
            == (seeded.seed_client["client_secret"])
        )

        seeded.reset()
        clients = [c["client_id"] for c in seeded.clients()]
        assert clients == [seeded.seed_client["client_id"]]


def test_in_thread_variant_shares_state() -> None:
    state = StandInState()
    with StandInThread(state) as standin:
        hub = standin.create_client()
        alice = standin.create_identity("alice@example.org")
        upstream = standin.issue_token(alice["id"], client_id=hub["client_id"])

        ac = globus_sdk.ConfidentialAppAuthClient(
            hub["client_id"],
            hub["client_secret"],
            base_url=standin.env()["GLOBUS_SDK_SERVICE_URL_AUTH"],
            retry_config=no_retry(),
        )
        assert ac.oauth2_token_introspect(upstream["access_token"])["active"]

        with state.lock:
            assert upstream["access_token"] in state.tokens
        assert [c["operation"] for c in state.calls()] == ["introspect"]


def test_main_refuses_non_loopback_host() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--host", "192.0.2.10", "--port", "0"])
    assert caught.value.code == 2
