"""ACL mode survives a SIGKILL: the next start settles what the last one left.

A hub of its own (so the other end-to-end tests keep their service) runs
hub-transfer in ACL mode on a stand-in guest collection whose Access Manager
is the service's client. The service is killed with SIGKILL, which no code of
its own can react to, and JupyterHub starts it again:

(a) killed between creating a rule and submitting (held there by the test
    pause label): the new process revokes the rule, and no task exists;
(b) killed while two tasks run: their rules stay until the tasks end, then go;
(c) each new process says in its log what it recovered.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sqlite3
import threading
import time
import typing as t
import uuid

import pytest
import requests

from hub_transfer.testing.localhub import (
    GlobusSetup,
    LocalHub,
    LocalHubError,
    http,
    proxy_on_path,
)

from .conftest import hub_python

pytestmark = pytest.mark.e2e

USERS = ("alice", "bob")
COLLECTION = str(uuid.UUID(int=0xC0FFEE_0C2A_54))
SOURCE = str(uuid.UUID(int=0x5EED_0C2A_01))
PAUSE_LABEL = "pause-before-submit"
CRYPT_KEY = "3c" * 32
# every wait below is bounded by one of these
RULE_APPEARS_S = 15.0
SETTLE_S = 20.0
SERVICE_CONFIG = """\
c.AccessManager.poll_interval = 0.5
c.AccessManager.max_poll_interval = 1
"""


@pytest.fixture(scope="module")
def acl_globus() -> t.Iterator[GlobusSetup]:
    """A stand-in where the service's client manages COLLECTION's rules."""
    with GlobusSetup.start(
        USERS, client_name="hub-transfer crash", access_manager_of=[COLLECTION]
    ) as globus:
        yield globus


@pytest.fixture(scope="module")
def acl_hub(
    acl_globus: GlobusSetup, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[LocalHub]:
    python = hub_python()
    path = os.pathsep.join([str(pathlib.Path(python).parent), os.environ["PATH"]])
    if proxy_on_path(path) is None:
        pytest.skip("configurable-http-proxy is not on PATH (run scripts/setup.sh)")

    scratch = tmp_path_factory.mktemp("crash-hub")
    config = scratch / "hub_transfer_config.py"
    config.write_text(SERVICE_CONFIG)
    env = acl_globus.service_env()
    env.update(
        {
            "GLOBUS_COLLECTION_ID": COLLECTION,
            "HUB_TRANSFER_CRYPT_KEY": CRYPT_KEY,
            "HUB_TRANSFER_DB_URL": f"sqlite:///{scratch / 'ledger.sqlite'}",
            "HUB_TRANSFER_CONFIG_FILE": str(config),
            "HUB_TRANSFER_TEST_PAUSE_LABEL": PAUSE_LABEL,
            "HUB_TRANSFER_TEST_PAUSE_SECONDS": "30",
        }
    )
    hub = LocalHub(
        scratch,
        python=python,
        users=USERS,
        service_env=env,
        # the hub restarts a dead service at its next poll: every second here
        service_poll_interval=1,
    )
    try:
        try:
            hub.start()
        except LocalHubError as exc:
            pytest.fail(str(exc))
        yield hub
    finally:
        outcome = hub.stop()
        if outcome["leftovers"]:
            print("killed what the hub left running:", json.dumps(outcome))


@pytest.fixture(scope="module")
def recoveries() -> dict[str, str]:
    """What each restarted service logged, by test, for (c)."""
    return {}


def document(globus: GlobusSetup, user: str, label: str) -> dict[str, t.Any]:
    """A transfer from elsewhere into the user's area of the hub collection."""
    return {
        "globus_token": globus.token(user),
        "transfer": {
            "source_endpoint": SOURCE,
            "destination_endpoint": COLLECTION,
            "DATA": [
                {
                    "source_path": "/data/results.csv",
                    "destination_path": f"/{user}/{label}/results.csv",
                    "recursive": False,
                }
            ],
            "label": label,
        },
    }


def submit(hub: LocalHub, user: str, body: dict[str, t.Any]) -> requests.Response:
    return http(
        "POST",
        hub.service_url,
        json=body,
        headers={"Authorization": f"Bearer {hub.server_token(user)}"},
        timeout=45,
    )


def rules(globus: GlobusSetup) -> list[dict[str, t.Any]]:
    return list(globus.standin.acl_rules(COLLECTION))


def tasks_labelled(globus: GlobusSetup, label: str) -> list[dict[str, t.Any]]:
    return [task for task in globus.standin.tasks() if task.get("label") == label]


def ledger_rules(hub: LocalHub) -> int:
    """Rules the service's own database still tracks (read-only)."""
    path = hub.scratch / "ledger.sqlite"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        return int(db.execute("SELECT count(*) FROM rules").fetchone()[0])


def wait_for(what: str, check: t.Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout:g} s")


def kill_and_restart(hub: LocalHub) -> tuple[str, float]:
    """SIGKILL the service; the log the hub's restart of it wrote, and how
    long until the new process answered."""
    offset = len(hub.log_text())
    started = time.monotonic()
    old = hub.kill_service(signal.SIGKILL)
    hub.wait_service_up(not_pid=old)
    return hub.log_text()[offset:], time.monotonic() - started


def test_a_kill_between_rule_and_submit_revokes_the_rule(
    acl_hub: LocalHub,
    acl_globus: GlobusSetup,
    recoveries: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = acl_globus.identity_id("alice")
    assert rules(acl_globus) == []
    answers: list[requests.Response | Exception] = []

    def held_request() -> None:
        try:
            answers.append(
                submit(acl_hub, "alice", document(acl_globus, "alice", PAUSE_LABEL))
            )
        except requests.RequestException as exc:
            answers.append(exc)

    client = threading.Thread(target=held_request, daemon=True)
    client.start()
    # the rule exists at Globus, and the service recorded it and is now held
    # between the rule and the submit (it logs the pause after recording)
    wait_for(
        "the rule for the held transfer",
        lambda: (
            any(
                r["principal"] == alice and r["path"] == f"/alice/{PAUSE_LABEL}/"
                for r in rules(acl_globus)
            )
            and "Test pause: holding" in acl_hub.log_text()
        ),
        RULE_APPEARS_S,
    )

    log, restart_s = kill_and_restart(acl_hub)
    recoveries["a"] = log
    settle_s = wait_for(
        "the orphaned rule to be revoked",
        lambda: rules(acl_globus) == [] and ledger_rules(acl_hub) == 0,
        SETTLE_S,
    )
    client.join(10)
    assert not client.is_alive(), "the held request got no answer after the kill"

    with capsys.disabled():
        print(
            f"\n[crash] killed in the pause: service back in {restart_s:.1f}s, "
            f"rule gone {settle_s:.1f}s later"
        )
    # the caller never got a 201 for a transfer that never reached Globus
    answer = answers[0]
    assert not isinstance(answer, requests.Response) or answer.status_code != 201
    assert tasks_labelled(acl_globus, PAUSE_LABEL) == []
    assert acl_globus.standin.calls("submit_transfer") == []


def test_b_rules_of_running_tasks_survive_a_kill_until_the_tasks_end(
    acl_hub: LocalHub,
    acl_globus: GlobusSetup,
    recoveries: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert rules(acl_globus) == []
    task_ids = []
    for user in USERS:
        response = submit(acl_hub, user, document(acl_globus, user, f"live-{user}"))
        assert response.status_code == 201, response.text
        task_ids.append(response.json()["task_id"])
    running = {t["task_id"]: t["status"] for t in acl_globus.standin.tasks()}
    assert [running[task] for task in task_ids] == ["ACTIVE", "ACTIVE"]
    before = {r["id"]: (r["principal"], r["path"]) for r in rules(acl_globus)}
    assert sorted(path for _, path in before.values()) == [
        "/alice/live-alice/",
        "/bob/live-bob/",
    ]

    log, restart_s = kill_and_restart(acl_hub)
    recoveries["b"] = log
    # several reconciler sweeps (every 0.5-1 s) of the new process: the tasks
    # still run, so the rules must stay exactly as they were
    time.sleep(3)
    assert {r["id"]: (r["principal"], r["path"]) for r in rules(acl_globus)} == before
    assert ledger_rules(acl_hub) == 2

    for task_id in task_ids:
        acl_globus.standin.set_task_status(task_id, "SUCCEEDED")
    # Globus first, then the ledger: wait for both
    settle_s = wait_for(
        "the rules of the ended tasks to be revoked",
        lambda: rules(acl_globus) == [] and ledger_rules(acl_hub) == 0,
        SETTLE_S,
    )
    with capsys.disabled():
        print(
            f"\n[crash] killed with 2 tasks running: service back in "
            f"{restart_s:.1f}s, rules kept, revoked {settle_s:.1f}s after the "
            "tasks ended"
        )


def test_c_the_log_says_what_was_recovered(recoveries: dict[str, str]) -> None:
    if set(recoveries) != {"a", "b"}:
        pytest.skip("needs both crash tests above to have run")
    assert (
        "Recovered the ledger: 1 unfinished submission(s) dropped, 1 rule(s) "
        "revoked, 0 running task(s) still tracked"
    ) in recoveries["a"]
    assert f"revoked: /alice/{PAUSE_LABEL}/" in recoveries["a"]
    assert (
        "Recovered the ledger: 0 unfinished submission(s) dropped, 0 rule(s) "
        "revoked, 2 running task(s) still tracked"
    ) in recoveries["b"]
    for log in recoveries.values():
        # the hub saw the kill and started the service again
        assert "Service hub-transfer exited with status -9" in log
        assert "Traceback" not in log
