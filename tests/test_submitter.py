"""TransferSubmitter against the Globus stand-in: real globus-sdk, real HTTP."""

from __future__ import annotations

import asyncio

import pytest

from hub_transfer.errors import ServiceError
from hub_transfer.globus import TransferSubmitter
from hub_transfer.model import TransferDocument, TransferItem

from .globus_fixtures import HUB_COLLECTION, globus, globus_process, real_submitter

__all__ = ["globus", "globus_process", "real_submitter"]

DOCUMENT = TransferDocument(
    source_endpoint="ddb59aef-6d04-11e5-ba46-22000b92c6ec",
    destination_endpoint=HUB_COLLECTION,
    items=(
        TransferItem("/share/godata/file1.txt", "/alice/file1.txt"),
        TransferItem("/foo/bar", "/alice/bar/", True),
    ),
    label="submitter test",
)


async def submit(submitter, token):
    user = await submitter.authenticate(token)
    credential = await submitter.user_credential(token, user)
    return user, await submitter.submit(credential, user, DOCUMENT)


async def test_submits_as_the_user(globus, real_submitter):
    user, result = await submit(real_submitter, globus.user_token("alice"))

    assert user.identity_id == globus.identity("alice")
    assert user.username == "alice@example.org"
    task = next(t for t in globus.standin.tasks() if t["task_id"] == result["task_id"])
    assert task["owner_id"] == globus.identity("alice")
    assert task["label"] == "submitter test"
    assert [
        (i["source_path"], i["destination_path"], i["recursive"]) for i in task["DATA"]
    ] == [
        ("/share/godata/file1.txt", "/alice/file1.txt", False),
        ("/foo/bar", "/alice/bar/", True),
    ]


async def test_warm_path_is_two_globus_calls(globus, real_submitter):
    token = globus.user_token("alice")
    await submit(real_submitter, token)
    globus.standin.clear_calls()

    await submit(real_submitter, token)

    assert globus.operations() == ["submission_id", "submit_transfer"]


async def test_concurrent_cold_requests_share_one_introspection(globus, real_submitter):
    token = globus.user_token("alice")
    await asyncio.gather(*(submit(real_submitter, token) for _ in range(6)))

    ops = globus.operations()
    assert ops.count("introspect") == 1
    assert ops.count("dependent_token") == 1
    assert ops.count("submit_transfer") == 6


@pytest.mark.parametrize(
    "make_token, error",
    [
        (lambda g: g.user_token("alice", active=False), "globus_token_inactive"),
        (lambda g: g.user_token("alice", expires_in=-5), "globus_token_inactive"),
        (
            lambda g: g.standin.issue_token(
                g.identity("alice"), "urn:globus:auth:scope:transfer.api.globus.org:all"
            )["access_token"],
            "globus_token_inactive",
        ),
        (lambda g: "made-up-token", "globus_token_inactive"),
    ],
)
async def test_bad_user_tokens_are_401(globus, real_submitter, make_token, error):
    with pytest.raises(ServiceError) as caught:
        await real_submitter.authenticate(make_token(globus))
    assert caught.value.status_code == 401
    assert caught.value.error == error


async def test_token_of_another_scope_of_ours_is_refused(globus, real_submitter):
    real_submitter.required_scope = globus.scope + "_other"
    with pytest.raises(ServiceError) as caught:
        await real_submitter.authenticate(globus.user_token("alice"))
    assert caught.value.error == "globus_token_scope"


async def test_failed_introspection_is_cached_too(globus, real_submitter):
    for _ in range(3):
        with pytest.raises(ServiceError):
            await real_submitter.authenticate("made-up-token")
    assert globus.operations().count("introspect") == 1


async def test_wrong_client_secret_is_a_502_not_the_users_fault(globus):
    submitter = TransferSubmitter(
        client_id=globus.client["client_id"],
        client_secret="wrong",
        required_scope=globus.scope,
        max_retries=0,
    )
    try:
        with pytest.raises(ServiceError) as caught:
            await submitter.authenticate(globus.user_token("alice"))
    finally:
        submitter.close()
    assert caught.value.status_code == 502
    assert caught.value.error == "service_credentials_rejected"
    assert "wrong" not in str(caught.value.to_json())


async def test_consent_required_gives_scopes(globus, real_submitter):
    globus.standin.set_consent_required(globus.identity("alice"))
    with pytest.raises(ServiceError) as caught:
        await submit(real_submitter, globus.user_token("alice"))

    err = caught.value
    assert err.status_code == 403
    assert err.error == "consent_required"
    assert err.details["globus_code"] == "ConsentRequired"
    assert err.details["required_scopes"]
    assert err.details["request_id"]


@pytest.mark.parametrize(
    "fault, status, error",
    [
        ({"status": 500}, 502, "globus_unavailable"),
        ({"status": 503}, 502, "globus_unavailable"),
        ({"status": 429}, 503, "globus_rate_limited"),
        ({"drop": True}, 502, "globus_unreachable"),
        ({"status": 404, "code": "EndpointNotFound"}, 404, "transfer_rejected"),
    ],
)
async def test_globus_failures_map_to_clean_errors(
    globus, real_submitter, fault, status, error
):
    token = globus.user_token("alice")
    globus.standin.add_fault("submit_transfer", **fault)

    with pytest.raises(ServiceError) as caught:
        await submit(real_submitter, token)

    assert caught.value.status_code == status
    assert caught.value.error == error


async def test_rate_limit_passes_on_retry_after(globus, real_submitter):
    token = globus.user_token("alice")
    globus.standin.add_fault("submit_transfer", status=429, retry_after=7)
    with pytest.raises(ServiceError) as caught:
        await submit(real_submitter, token)
    assert caught.value.status_code == 503
    assert caught.value.headers["Retry-After"] == "7"


async def test_timeout_is_504(globus, real_submitter):
    real_submitter.close()
    submitter = TransferSubmitter(
        client_id=globus.client["client_id"],
        client_secret=globus.client["client_secret"],
        required_scope=globus.scope,
        max_retries=0,
        http_timeout=0.3,
    )
    globus.standin.add_fault("introspect", hang=2, count=1)
    try:
        with pytest.raises(ServiceError) as caught:
            await submitter.authenticate(globus.user_token("alice"))
    finally:
        submitter.close()
    assert caught.value.status_code == 504
    assert caught.value.error == "globus_timeout"


async def test_transient_failure_is_retried_with_the_same_submission_id(globus):
    submitter = TransferSubmitter(
        client_id=globus.client["client_id"],
        client_secret=globus.client["client_secret"],
        required_scope=globus.scope,
        max_retries=2,
    )
    globus.standin.add_fault("submit_transfer", status=502, count=1)
    try:
        _, result = await submit(submitter, globus.user_token("alice"))
    finally:
        submitter.close()

    submits = globus.standin.calls("submit_transfer")
    assert [c["status"] for c in submits] == [502, 202]
    tasks = [t for t in globus.standin.tasks() if t["task_id"] == result["task_id"]]
    assert len(tasks) == 1
    assert len(globus.standin.tasks()) == 1


async def test_transfer_token_dropped_after_401(globus, real_submitter):
    token = globus.user_token("alice")
    await submit(real_submitter, token)
    globus.standin.add_fault(
        "submit_transfer", status=401, code="AuthenticationFailed", count=1
    )
    with pytest.raises(ServiceError):
        await submit(real_submitter, token)
    globus.standin.clear_calls()

    await submit(real_submitter, token)
    assert "dependent_token" in globus.operations()
