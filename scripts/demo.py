"""hub-transfer end to end, on one machine, in a few seconds.

Starts the Globus stand-in and a real JupyterHub running hub-transfer as its
managed service in ACL mode, then does what the Globus JupyterLab extension
does: POSTs transfer documents to ``/services/hub-transfer/`` with the token
the hub gave the user's server. It shows a plain submission, one into the hub's
guest collection with its temporary ACL rule granted and then revoked when the
task ends, and one refusal. Everything listens on 127.0.0.1, scratch files go
to a temporary directory, and everything is stopped at the end, on Ctrl-C and
on error. The exit status is 0 only if every step did what it should.

Run it with ``scripts/demo.sh`` (which sets up the venv and puts
configurable-http-proxy on PATH). ``HUB_PYTHON`` picks another interpreter for
the hub, e.g. ``.venv-hub55/bin/python`` for JupyterHub 5.5.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import signal
import sys
import tempfile
import textwrap
import time
import typing as t
import uuid

from hub_transfer.log import token_label
from hub_transfer.testing.localhub import (
    SERVICE,
    GlobusSetup,
    LocalHub,
    LocalHubError,
    http,
)

USER, OTHER = "alice", "bob"
# the collection the hub's users' home directories are shared from; fixed so
# that runs of the demo read alike
COLLECTION = str(uuid.uuid5(uuid.NAMESPACE_URL, "hub-transfer demo collection"))

# the example document of the extension's docs, verbatim (hub-managed services)
SEED_SOURCE = "ddb59aef-6d04-11e5-ba46-22000b92c6ec"
SEED_DESTINATION = "ddb59af0-6d04-11e5-ba46-22000b92c6ec"
SEED_TRANSFER = {
    "source_endpoint": SEED_SOURCE,
    "destination_endpoint": SEED_DESTINATION,
    "DATA": [
        {
            "source_path": "/share/godata/file1.txt",
            "destination": "~/",
            "recursive": False,
        },
        {"source_path": "/foo/bar", "destination": "~/bar", "recursive": True},
    ],
}

REVOKE_TIMEOUT = 15.0
ACCESS_SCOPE = f"access:services!service={SERVICE}"


class DemoFailed(Exception):
    """A step did not do what it should; the message says which and how."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailed(message)


def say(text: str = "", step: int | None = None) -> None:
    prefix = f"[{step}/6] " if step else "      "
    print(prefix + text, flush=True)


def hub_python() -> str:
    return os.environ.get("HUB_PYTHON") or sys.executable


def transfer_into_collection(destination: str, label: str) -> dict[str, t.Any]:
    """A file from the Globus tutorial collection into the hub's collection."""
    return {
        "source_endpoint": SEED_SOURCE,
        "destination_endpoint": COLLECTION,
        "DATA": [
            {"source_path": "/share/godata/file2.txt", "destination": destination}
        ],
        "label": label,
    }


class Extension:
    """What the JupyterLab extension does from a user's server: POST the
    document with the server's own hub token and the user's Globus token."""

    def __init__(self, hub: LocalHub, globus: GlobusSetup, user: str) -> None:
        self.hub = hub
        self.server_token = hub.server_token(user)
        self.globus_token = globus.token(user)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.server_token}"}

    def submit(self, transfer: dict[str, t.Any]) -> tuple[int, dict[str, t.Any]]:
        body = {"globus_token": self.globus_token, "transfer": transfer}
        response = http(
            "POST", self.hub.service_url, json=body, headers=self.headers(), timeout=30
        )
        try:
            answer = response.json()
        except ValueError:
            answer = {"error": "not_json", "message": response.text[:200]}
        return response.status_code, answer

    def tracked(self) -> list[dict[str, t.Any]]:
        """The user's transfers as the service tracks them (ACL mode)."""
        url = self.hub.service_url + "api/transfers"
        response = http("GET", url, headers=self.headers())
        check(response.status_code == 200, f"GET api/transfers: {response.text}")
        return list(response.json()["items"])


def recorded_task(globus: GlobusSetup, task_id: str) -> dict[str, t.Any]:
    tasks = [task for task in globus.standin.tasks() if task["task_id"] == task_id]
    check(len(tasks) == 1, f"the stand-in has no task {task_id}")
    return tasks[0]


def describe_items(task: dict[str, t.Any]) -> list[str]:
    return [
        f"  {item['source_path']} -> {item['destination_path']}"
        + (" (recursive)" if item.get("recursive") else "")
        for item in task["DATA"]
    ]


def wait_for(condition: t.Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not in ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.2)
    return None


# ----------------------------------------------------------------------
# the steps


def start_globus() -> GlobusSetup:
    globus = GlobusSetup.start(
        (USER, OTHER), client_name="hub-transfer demo", access_manager_of=[COLLECTION]
    )
    say(f"Globus stand-in at {globus.standin.url}", step=1)
    say(f"service client {globus.client_id}, Access Manager of")
    say(f"  the demo guest collection {COLLECTION}")
    say(f"hub user {USER} logs in to Globus as {USER}@example.org")
    say(f"  (identity {globus.identity_id(USER)})")
    return globus


def make_hub(globus: GlobusSetup, scratch: pathlib.Path) -> LocalHub:
    """The hub, with the service in ACL mode and a fast task poll."""
    config = scratch / "hub_transfer_config.py"
    config.write_text(
        "# revoke rules seconds after a task ends, not the default 30 s\n"
        "c.AccessManager.poll_interval = 1\n"
    )
    service_env = globus.service_env()
    service_env.update(
        {
            "GLOBUS_COLLECTION_ID": COLLECTION,
            "HUB_TRANSFER_CRYPT_KEY": secrets.token_hex(32),
            "HUB_TRANSFER_DB_URL": f"sqlite:///{scratch / 'hub-transfer.sqlite'}",
            "HUB_TRANSFER_CONFIG_FILE": str(config),
        }
    )
    return LocalHub(
        scratch / "hub",
        python=hub_python(),
        users=(USER, OTHER),
        service_env=service_env,
    )


def start_hub(hub: LocalHub) -> None:
    started = time.monotonic()
    hub.start()
    check("ACL mode on" in hub.log_text(), "the service did not start in ACL mode")
    took = time.monotonic() - started
    say(f"JupyterHub {hub.version} at {hub.url} (up in {took:.1f} s)", step=2)
    say("hub-transfer runs as its managed service, in ACL mode on the demo")
    say("  collection (fresh crypt key, scratch database, tasks polled every 1 s)")


def submit_seed(globus: GlobusSetup, extension: Extension) -> None:
    """The docs' example document, as the extension sends it."""
    response = http(
        "GET", extension.hub.url + "/hub/api/user", headers=extension.headers()
    )
    scopes = response.json().get("scopes", []) if response.status_code == 200 else []
    check(ACCESS_SCOPE in scopes, f"the server token lacks {ACCESS_SCOPE}")
    digest = token_label(extension.server_token)
    say(f"{USER}'s server token (sha256 {digest}) holds", step=3)
    say(f"  {ACCESS_SCOPE}")

    status, answer = extension.submit(SEED_TRANSFER)
    check(status == 201, f"the seed document got {status}: {answer}")
    task_id = answer["task_id"]
    say(f"POST /services/{SERVICE}/ with the docs' example document: {status}")
    say(f"  task_id {task_id}")

    task = recorded_task(globus, task_id)
    owner = task["owner_id"]
    check(owner == globus.identity_id(USER), f"task owned by {owner}, not {USER}")
    check(
        [
            (i["source_path"], i["destination_path"], i["recursive"])
            for i in task["DATA"]
        ]
        == [("/share/godata/file1.txt", "~/", False), ("/foo/bar", "~/bar", True)],
        f"the stand-in recorded other items: {task['DATA']}",
    )
    say(f"Globus recorded: owner {USER}@example.org (identity {owner[:8]}...),")
    say(f"  label {task['label'] or '(none)'}, {len(task['DATA'])} items:")
    for line in describe_items(task):
        say(line)


def submit_into_collection(globus: GlobusSetup, extension: Extension) -> None:
    """A transfer into the user's area: a rule is granted, then revoked."""
    destination = f"/{USER}/results/file2.txt"
    status, answer = extension.submit(transfer_into_collection(destination, "demo"))
    check(status == 201, f"the transfer into the collection got {status}: {answer}")
    task_id = answer["task_id"]
    say(f"POST into the demo collection, to {destination}: {status}", step=4)
    say(f"  task_id {task_id}")

    rules = globus.standin.acl_rules(COLLECTION)
    check(len(rules) == 1, f"expected one ACL rule, the stand-in has {rules}")
    rule = rules[0]
    check(
        (rule["principal"], rule["path"], rule["permissions"])
        == (globus.identity_id(USER), f"/{USER}/results/", "rw"),
        f"unexpected rule {rule}",
    )
    say(f"Globus now holds ACL rule {rule['id']}:")
    say(f"  {rule['permissions']} on {rule['path']} for {USER}@example.org,")
    say(f"  expiring {rule['expiration_date']} at the latest")

    globus.standin.set_task_status(task_id, "SUCCEEDED")
    took = wait_for(lambda: not globus.standin.acl_rules(COLLECTION), REVOKE_TIMEOUT)
    check(took is not None, f"the rule was not revoked within {REVOKE_TIMEOUT:g} s")
    say(f"task marked SUCCEEDED at Globus: the rule was revoked {took:.1f} s later")

    tracked = {item["task_id"]: item for item in extension.tracked()}
    record = tracked.get(task_id, {})
    state, task_status = record.get("state"), record.get("status")
    check(state == "ended", f"the service's record of the task: {record}")
    say(f"the service's record of the task: {state}, {task_status}")


def show_refusal(globus: GlobusSetup, extension: Extension) -> None:
    """Another user's area is off limits: no rule, no task."""
    tasks_before = len(globus.standin.tasks())
    destination = f"/{OTHER}/notes.txt"
    status, answer = extension.submit(transfer_into_collection(destination, "demo"))
    check(
        (status, answer.get("error")) == (403, "path_not_allowed"),
        f"a path in {OTHER}'s area got {status}: {answer}",
    )
    check(not globus.standin.acl_rules(COLLECTION), "a rule was created anyway")
    check(len(globus.standin.tasks()) == tasks_before, "a task was submitted anyway")
    say(f"POST as {USER}, to {destination} in {OTHER}'s area: {status}", step=5)
    say(f"  {answer['error']}: nothing granted, nothing submitted. The message:")
    for line in textwrap.wrap(str(answer.get("message")), 72):
        say(f"  {line}")


def stop_all(hub: LocalHub | None, globus: GlobusSetup | None) -> bool:
    """Stop the hub, then the stand-in; whether the hub stopped cleanly."""
    clean = True
    if hub is not None and hub.proc is not None:
        outcome = hub.stop()
        service = outcome["service_exit_s"]
        clean = (
            outcome["signal"] == "SIGINT"
            and outcome["returncode"] == 0
            and service is not None
            and not outcome["leftovers"]
        )
        say(
            f"JupyterHub stopped by {outcome['signal']} in "
            f"{outcome['hub_exit_s']:.1f} s (exit {outcome['returncode']}),",
            step=6,
        )
        say(
            "  hub-transfer "
            + ("never stopped" if service is None else f"in {service:.1f} s")
            + ("" if outcome["leftovers"] else ", nothing left running")
        )
        if outcome["leftovers"]:
            say(f"had to kill: {', '.join(outcome['leftovers'])}")
    if globus is not None:
        globus.stop()
        say("stopped the Globus stand-in")
    return clean


def run(scratch: pathlib.Path) -> int:
    """Every step, then the clean-up; the exit status (130: interrupted)."""
    hub: LocalHub | None = None
    globus: GlobusSetup | None = None
    status = 1
    try:
        globus = start_globus()
        # named before it starts, so an interrupted start is still stopped
        hub = make_hub(globus, scratch)
        start_hub(hub)
        extension = Extension(hub, globus, USER)
        submit_seed(globus, extension)
        submit_into_collection(globus, extension)
        show_refusal(globus, extension)
        status = 0
    except (DemoFailed, LocalHubError) as exc:
        print(f"demo FAILED: {exc}", flush=True)
        if hub is not None and not isinstance(exc, LocalHubError):
            print("hub log tail:\n" + hub.log_tail(30), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", flush=True)
        status = 130
    except Exception as exc:
        # the stand-in or the hub went away under us, say: report, clean up
        print(f"demo FAILED: {type(exc).__name__}: {exc}", flush=True)
    finally:
        # a second Ctrl-C must not cut the clean-up short; it is bounded anyway
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        clean = stop_all(hub, globus)
    return 1 if status == 0 and not clean else status


def _interrupt(signum: int, frame: t.Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C works even when started from a script that ignores it, and
    # SIGTERM takes the same way out, through every clean-up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    print("hub-transfer demo: a real JupyterHub and the Globus stand-in, all local")
    with tempfile.TemporaryDirectory(prefix="hub-transfer-demo-") as scratch:
        status = run(pathlib.Path(scratch))
    verdict = "OK" if status == 0 else "FAILED"
    print(f"demo {verdict} in {time.monotonic() - started:.1f} s", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
