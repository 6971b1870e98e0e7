"""ACL mode end to end in-process: real globus-sdk, the stand-in, a real SQLite.

Hub identity comes from the fake hub (the real hub is covered by tests/e2e);
everything from the transfer document onwards is the real code path.
"""

from __future__ import annotations

import asyncio
import sqlite3

import globus_sdk
import pytest
from sqlalchemy import select
from traitlets.config import Config

from hub_transfer.app import HubTransferApp
from hub_transfer.errors import ServiceError
from hub_transfer.store.models import Credential, Rule, Submission

from .conftest import SOURCE, transfer_body
from .globus_fixtures import HUB_COLLECTION, globus, globus_process, real_submitter

__all__ = ["globus", "globus_process", "real_submitter"]


@pytest.fixture
def hub_app(fake_hub_auth, real_submitter, tmp_path, globus):
    fake_hub_auth.users["admin-token"] = {
        "kind": "user",
        "name": "admin",
        "admin": True,
        "groups": [],
        "scopes": ["access:services!service=hub-transfer"],
    }
    config = Config()
    config.AccessManager.collection_id = HUB_COLLECTION
    config.AccessManager.poll_interval = 0.0
    app = HubTransferApp(
        config=config,
        hub_auth=fake_hub_auth,
        submitter=real_submitter,
        service_prefix="/services/hub-transfer/",
        db_url=f"sqlite:///{tmp_path / 'ledger.sqlite'}",
    )
    app.init_submitter()
    app.init_access()
    app.init_tornado()
    yield app
    app.store.close()


@pytest.fixture
def reconciler(hub_app):
    from hub_transfer.access import Reconciler

    return Reconciler(hub_app.access)


def into(*paths: str, recursive: bool = False, label: str = "acl test"):
    """A transfer from elsewhere into the hub collection."""
    body = transfer_body(
        destination_endpoint=HUB_COLLECTION,
        DATA=[
            {"source_path": f"/src{i}", "destination_path": p, "recursive": recursive}
            for i, p in enumerate(paths)
        ],
        label=label,
    )
    return body


def with_token(body, token):
    body["globus_token"] = token
    return body


def ledger(hub_app, model):
    with hub_app.store.session() as db:
        return list(db.scalars(select(model)))


async def test_transfer_in_creates_rw_rule_then_revokes_it(
    api, globus, hub_app, reconciler
):
    token = globus.user_token("alice")
    status, body, _ = await api.submit(with_token(into("/alice/data/f.txt"), token))

    assert status == 201, body
    rules = globus.rules()
    assert len(rules) == 1
    assert rules[0]["principal"] == globus.identity("alice")
    assert rules[0]["path"] == "/alice/data/"
    assert rules[0]["permissions"] == "rw"
    assert rules[0]["expiration_date"]

    # the task is owned by alice, with the items and label she sent
    task = next(t for t in globus.standin.tasks() if t["task_id"] == body["task_id"])
    assert task["owner_id"] == globus.identity("alice")
    assert task["label"] == "acl test"

    # still running: the rule stays
    await reconciler.sweep()
    assert len(globus.rules()) == 1

    globus.standin.set_task_status(body["task_id"], "SUCCEEDED")
    result = await reconciler.sweep()
    assert result["ended"] == 1
    assert globus.rules() == []
    assert ledger(hub_app, Rule) == []


async def test_transfer_out_needs_read_only(api, globus):
    token = globus.user_token("alice")
    body = transfer_body(
        source_endpoint=HUB_COLLECTION,
        DATA=[
            {
                "source_path": "/alice/results",
                "destination_path": "/x",
                "recursive": True,
            }
        ],
    )
    status, answer, _ = await api.submit(with_token(body, token))

    assert status == 201, answer
    [rule] = globus.rules()
    assert (rule["path"], rule["permissions"]) == ("/alice/results/", "r")


async def test_two_transfers_share_one_rule(api, globus, hub_app, reconciler):
    token = globus.user_token("alice")
    first = (await api.submit(with_token(into("/alice/d/1"), token)))[1]
    second = (await api.submit(with_token(into("/alice/d/2"), token)))[1]

    assert len(globus.rules()) == 1
    assert globus.operations().count("acl_add") == 1

    globus.standin.set_task_status(first["task_id"], "SUCCEEDED")
    await reconciler.sweep()
    assert len(globus.rules()) == 1, "the second task still needs the rule"

    globus.standin.set_task_status(second["task_id"], "FAILED")
    await reconciler.sweep()
    assert globus.rules() == []


async def test_concurrent_transfers_into_one_directory_make_one_rule(
    api, globus, hub_app
):
    hub_app.limits.max_concurrent = 8
    token = globus.user_token("alice")
    answers = await asyncio.gather(
        *(api.submit(with_token(into(f"/alice/same/{i}"), token)) for i in range(8))
    )

    assert [a[0] for a in answers] == [201] * 8
    assert len(globus.rules()) == 1


async def test_two_directories_two_rules(api, globus, reconciler):
    token = globus.user_token("alice")
    status, body, _ = await api.submit(
        with_token(into("/alice/a/f", "/alice/b/g"), token)
    )

    assert status == 201
    assert sorted(r["path"] for r in globus.rules()) == ["/alice/a/", "/alice/b/"]

    globus.standin.set_task_status(body["task_id"], "SUCCEEDED")
    await reconciler.sweep()
    assert globus.rules() == []


@pytest.mark.parametrize("status", [403, 500])
async def test_failed_submit_removes_new_rules_at_once(api, globus, hub_app, status):
    token = globus.user_token("alice")
    globus.standin.add_fault(
        "submit_transfer", status, code="PermissionDenied", count=1
    )

    code, body, _ = await api.submit(with_token(into("/alice/x/f"), token))

    assert code in (403, 502)
    assert body["globus_code"] == "PermissionDenied"
    assert "acl_add" in globus.operations()
    assert globus.rules() == []
    assert ledger(hub_app, Rule) == []
    assert ledger(hub_app, Submission) == []


@pytest.mark.parametrize(
    "path, status, error",
    [
        ("/bob/f", 403, "path_not_allowed"),
        ("/alice/../bob/f", 400, "invalid_path"),
        ("~/f", 400, "invalid_path"),
        ("/f", 403, "path_not_allowed"),
    ],
)
async def test_paths_outside_the_users_area_ask_for_no_rule(
    api, globus, hub_app, path, status, error
):
    token = globus.user_token("alice")
    code, body, _ = await api.submit(with_token(into(path), token))

    assert code == status
    assert body["error"] == error
    assert "acl_add" not in globus.operations()
    assert "submit_transfer" not in globus.operations()
    assert ledger(hub_app, Submission) == []


async def test_existing_rule_is_reused_and_never_deleted(
    api, globus, hub_app, reconciler
):
    planted = globus.standin.plant_acl_rule(
        HUB_COLLECTION, globus.identity("alice"), "/alice/shared/", "rw"
    )
    token = globus.user_token("alice")
    status, body, _ = await api.submit(with_token(into("/alice/shared/f"), token))

    assert status == 201, body
    assert len(globus.rules()) == 1
    [rule] = ledger(hub_app, Rule)
    assert rule.owned is False

    globus.standin.set_task_status(body["task_id"], "SUCCEEDED")
    await reconciler.sweep()
    assert [r["id"] for r in globus.rules()] == [planted["id"]]
    assert ledger(hub_app, Rule) == []


async def test_read_rule_is_widened_for_a_write(api, globus, hub_app):
    token = globus.user_token("alice")
    out = transfer_body(
        source_endpoint=HUB_COLLECTION,
        DATA=[{"source_path": "/alice/w", "destination_path": "/x", "recursive": True}],
    )
    assert (await api.submit(with_token(out, token)))[0] == 201
    assert (await api.submit(with_token(into("/alice/w/", recursive=True), token)))[
        0
    ] == 201

    [rule] = globus.rules()
    assert rule["permissions"] == "rw"
    assert "acl_update" in globus.operations()


async def test_rule_cap_answers_503(api, globus, hub_app):
    hub_app.access.max_rules = 1
    token = globus.user_token("alice")
    assert (await api.submit(with_token(into("/alice/one/f"), token)))[0] == 201

    code, body, response = await api.submit(with_token(into("/alice/two/f"), token))
    assert code == 503
    assert body["error"] == "acl_capacity"
    assert response.headers["Retry-After"]
    assert len(globus.rules()) == 1


async def test_polling_batches_one_call_per_user(api, globus, hub_app, reconciler):
    token = globus.user_token("alice")
    for i in range(3):
        assert (await api.submit(with_token(into(f"/alice/p{i}/f"), token)))[0] == 201
    globus.standin.clear_calls()

    result = await reconciler.sweep()

    assert result["checked"] == 3
    assert globus.operations().count("task_list") == 1


async def test_tasks_outliving_the_lifetime_release_rules(
    api, globus, hub_app, reconciler
):
    token = globus.user_token("alice")
    assert (await api.submit(with_token(into("/alice/long/f"), token)))[0] == 201
    hub_app.access.max_lifetime = 0.01
    await asyncio.sleep(0.05)

    await reconciler.sweep()
    assert globus.rules() == []


async def test_refresh_tokens_are_encrypted_at_rest(api, globus, hub_app, tmp_path):
    token = globus.user_token("alice")
    assert (await api.submit(with_token(into("/alice/enc/f"), token)))[0] == 201

    [credential] = ledger(hub_app, Credential)
    plain = hub_app.access.crypt.decrypt(credential.refresh_token)
    assert plain
    hub_app.store.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.sqlite*"))
    assert plain.encode() not in stored
    # and the raw column is not the token either
    with sqlite3.connect(tmp_path / "ledger.sqlite") as raw:
        [(blob,)] = raw.execute("select refresh_token from credentials").fetchall()
    assert plain.encode() not in blob


async def test_listings(api, globus, hub_app):
    alice = globus.user_token("alice")
    status, body, _ = await api.submit(with_token(into("/alice/l/f"), alice))
    assert status == 201

    code, page, _ = await api.request("GET", "api/transfers")
    assert code == 200
    assert [item["task_id"] for item in page["items"]] == [body["task_id"]]
    assert page["items"][0]["rules"][0]["path"] == "/alice/l/"

    code, page, _ = await api.request("GET", "api/transfers", token="bob-no-access")
    assert code == 403

    code, answer, _ = await api.request("GET", "api/acls")
    assert code == 403
    assert answer["error"] == "admin_only"

    code, page, _ = await api.request("GET", "api/acls?limit=10", token="admin-token")
    assert code == 200
    assert page["total"] == 1
    assert page["items"][0]["tasks"] == [body["task_id"]]

    code, answer, _ = await api.request("GET", "api/acls?limit=x", token="admin-token")
    assert code == 400


async def test_recover_removes_rules_of_unfinished_submissions(api, globus, hub_app):
    """A process died after Globus made the rule but before it was recorded."""
    access = hub_app.access
    token = globus.user_token("alice")
    globus_user = await hub_app.submitter.authenticate(token)
    from hub_transfer.policy import AccessNeed

    # plan (intent committed) and have Globus create the rule, but never
    # record its id: exactly the state a SIGKILL mid-request leaves behind
    hold, intents, _ = access._plan(
        "alice", globus_user.identity_id, [AccessNeed("/alice/crash/", "rw")], None
    )
    await access.acl.add_rule(
        globus_user.identity_id, "/alice/crash/", "rw", access.lifetime() + _now()
    )
    assert len(globus.rules()) == 1

    await access.recover()

    assert globus.rules() == []
    assert ledger(hub_app, Submission) == []
    # the intent stays watched in case a retry still creates the rule late
    assert len(ledger(hub_app, Rule)) == 1
    access.orphan_watch = 0
    await access.revoke_unheld()
    assert ledger(hub_app, Rule) == []


def _now():
    from hub_transfer.store.models import utcnow

    return utcnow()


async def test_source_elsewhere_is_untouched(api, globus, hub_app):
    token = globus.user_token("alice")
    body = transfer_body()
    assert body["transfer"]["source_endpoint"] == SOURCE
    status, _, _ = await api.submit(with_token(body, token))

    assert status == 201
    assert globus.rules() == []
    assert ledger(hub_app, Submission) == []


async def test_start_refuses_a_client_without_access_manager_role(hub_app, globus):
    from hub_transfer.app import StartupError

    await hub_app.check_globus()  # the fixture's client is Access Manager

    hub_app.access.collection_id = "c0ffee00-0000-4000-8000-0000000000ff"
    hub_app.access._acl = None
    with pytest.raises(StartupError) as caught:
        await hub_app.check_globus()
    message = str(caught.value)
    assert "collection" in message and "\n" not in message
    assert globus.client["client_secret"] not in message


@pytest.mark.parametrize("operation", ["client_credentials", "acl_list"])
async def test_start_carries_on_when_globus_is_down(hub_app, globus, operation):
    """A Globus outage at start must not stop the service (and with it the hub)."""
    globus.standin.add_fault(operation, status=503)
    await hub_app.check_globus()

    globus.standin.clear_faults()
    await hub_app.check_globus()


async def test_revocation_is_retried_after_a_globus_failure(
    api, globus, hub_app, reconciler
):
    token = globus.user_token("alice")
    status, body, _ = await api.submit(with_token(into("/alice/retry/f"), token))
    assert status == 201
    globus.standin.set_task_status(body["task_id"], "SUCCEEDED")
    globus.standin.add_fault("acl_delete", status=503, count=1)

    await reconciler.sweep()
    assert len(globus.rules()) == 1
    assert len(ledger(hub_app, Rule)) == 1

    await reconciler.sweep()
    assert globus.rules() == []
    assert ledger(hub_app, Rule) == []


async def test_kept_tokens_are_dropped_and_revoked_when_idle(
    api, globus, hub_app, reconciler
):
    token = globus.user_token("alice")
    status, body, _ = await api.submit(with_token(into("/alice/idle/f"), token))
    assert status == 201
    [credential] = ledger(hub_app, Credential)
    refresh_token = hub_app.access.keeper.decrypt(credential.refresh_token)

    await reconciler.sweep()
    assert len(ledger(hub_app, Credential)) == 1, "still needed while the task runs"

    globus.standin.set_task_status(body["task_id"], "SUCCEEDED")
    result = await reconciler.sweep()

    assert result["retired"] == 1
    assert ledger(hub_app, Credential) == []
    assert "revoke" in globus.operations()
    with pytest.raises(globus_sdk.AuthAPIError):
        hub_app.submitter.auth_client.oauth2_refresh_token(refresh_token)


async def test_ended_transfers_are_pruned_after_the_retention(
    api, globus, hub_app, reconciler
):
    token = globus.user_token("alice")
    status, body, _ = await api.submit(with_token(into("/alice/old/f"), token))
    globus.standin.set_task_status(body["task_id"], "FAILED")
    await reconciler.sweep()
    assert [s.state for s in ledger(hub_app, Submission)] == ["ended"]

    hub_app.access.history_retention = 0
    await asyncio.sleep(0.01)
    result = await reconciler.sweep()
    assert result["pruned"] == 1
    assert ledger(hub_app, Submission) == []


async def test_start_refuses_a_wrong_client_secret(hub_app, globus):
    from hub_transfer.app import StartupError

    hub_app.submitter.client_secret = "not-the-secret"
    hub_app.submitter._auth_client = None
    with pytest.raises(StartupError) as caught:
        await hub_app.check_globus()
    message = str(caught.value)
    assert "GLOBUS_CLIENT_SECRET" in message
    assert "not-the-secret" not in message


async def test_per_user_rule_quota(api, globus, hub_app):
    hub_app.access.max_rules_per_user = 2
    token = globus.user_token("alice")
    assert (await api.submit(with_token(into("/alice/q1/f", "/alice/q2/f"), token)))[
        0
    ] == 201
    status, body, response = await api.submit(with_token(into("/alice/q3/f"), token))

    assert status == 429
    assert body["error"] == "acl_user_quota"
    assert response.headers["Retry-After"]
    assert len(globus.rules()) == 2


async def test_rule_cap_counts_new_rules_once(api, globus, hub_app):
    hub_app.access.max_rules = 3
    token = globus.user_token("alice")
    status, body, _ = await api.submit(
        with_token(into("/alice/c1/f", "/alice/c2/f", "/alice/c3/f"), token)
    )
    assert status == 201, body
    assert len(globus.rules()) == 3


async def test_a_rule_globus_creates_late_is_found_and_deleted(globus, tmp_path):
    """Globus answers the rule request only after we gave up on it."""
    from hub_transfer.access import Reconciler
    from hub_transfer.globus import TransferSubmitter

    submitter = TransferSubmitter(
        client_id=globus.client["client_id"],
        client_secret=globus.client["client_secret"],
        required_scope=globus.scope,
        max_retries=0,
        http_timeout=0.5,
    )
    config = Config()
    config.AccessManager.collection_id = HUB_COLLECTION
    app = HubTransferApp(
        config=config, submitter=submitter, db_url=f"sqlite:///{tmp_path / 'l.db'}"
    )
    app.init_submitter()
    app.init_access()
    access = app.access
    token = globus.user_token("alice")
    user = await submitter.authenticate(token)
    from hub_transfer.policy import AccessNeed

    globus.standin.add_fault("acl_add", hang=1.5, count=1)
    with pytest.raises(ServiceError) as caught:
        await access.open("alice", user, [AccessNeed("/alice/late/", "rw")], None)
    assert caught.value.error == "globus_timeout"
    assert globus.rules() == []

    # Globus finishes the request we abandoned
    for _ in range(50):
        if globus.rules():
            break
        await asyncio.sleep(0.1)
    assert len(globus.rules()) == 1
    await Reconciler(access).sweep()
    assert globus.rules() == []
    # watched until the window closes, in case a retry creates it once more
    access.orphan_watch = 0
    await Reconciler(access).sweep()
    assert ledger(app, Rule) == []
    submitter.close()
    app.store.close()


async def test_a_managers_rule_made_meanwhile_is_not_deleted(globus, hub_app):
    """An unanswered request leaves an intent; a rule the collection's manager
    makes for the same identity and path is not taken for ours."""
    access = hub_app.access
    token = globus.user_token("alice")
    user = await hub_app.submitter.authenticate(token)
    from hub_transfer.policy import AccessNeed

    hold, _, _ = access._plan(
        "alice", user.identity_id, [AccessNeed("/alice/m/", "rw")], None
    )
    planted = globus.standin.plant_acl_rule(
        HUB_COLLECTION, user.identity_id, "/alice/m/", "rw"
    )
    access.orphan_watch = 0
    await access.abandon(hold)

    assert [r["id"] for r in globus.rules()] == [planted["id"]]
    assert ledger(hub_app, Rule) == []
