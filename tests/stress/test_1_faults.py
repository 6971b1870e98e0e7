"""Globus misbehaves: errors, rate limits, hangs and dropped connections.

The main run posts many transfers from several users while the stand-in fails
a share of every kind of call. Whatever Globus does, each request must end in
a 201 or in the service's own JSON error, the stand-in must hold exactly one
task per 201 and none per failure, and once the tasks end no rule may be left,
neither at Globus nor in the service's ledger.

The targeted cases after it pin down single failure sequences the random run
only meets by chance: a rule request answered too late, a revocation that
fails, a deadline passing while another request waits on the same token
lookup, a user's next transfer after the service retired their kept refresh
token, a submit cut by the deadline after it reached Globus, and a refused
submit whose clean-up waits for the user's lock past the deadline. Each
fails today because of a service bug (see its docstring); they stay, to pass
once it is fixed.
"""

from __future__ import annotations

import statistics
import time
import typing as t

import pytest

from .conftest import (
    Book,
    Outcome,
    Sizes,
    StressGlobus,
    StressHub,
    call,
    check_tasks,
    histogram,
    report,
    run_many,
    settled,
    submit,
    transfer_document,
    wait_for,
)

# what a Globus failure may turn into, by README; anything else is a bug
GLOBUS_ERRORS = {
    (502, "globus_unavailable"),
    (502, "globus_unreachable"),
    (503, "globus_rate_limited"),
    (504, "globus_timeout"),
    (504, "deadline_exceeded"),
}
# calls that change nothing at Globus: a pure hang there has no late effect
READ_ONLY = (
    "introspect",
    "dependent_token",
    "client_credentials",
    "refresh_token",
    "submission_id",
    "task_list",
    "acl_list",
)
HANG_S = 4.0  # longer than the service's http_timeout (3 s on this hub)


def install_faults(globus: StressGlobus, rate: float) -> list[dict[str, t.Any]]:
    """Fail about ``rate`` of all calls, in every way Globus can.

    Every fault that hits a call which changes something (a rule, a task)
    leaves no trace of the call at the stand-in: status and drop faults answer
    before any work, and hangs there end in a 503. Hangs that only delay the
    answer are kept to read-only calls; the targeted tests below cover late
    effects of calls that change something.
    """
    share = {
        ("*", 500, False, None): 0.25,
        ("*", 503, False, None): 0.25,
        ("*", 429, False, None): 0.2,
        ("*", None, True, None): 0.1,
        ("*", 503, False, HANG_S): 0.1,
    }
    installed = []
    for (operation, status, drop, hang), part in share.items():
        installed.append(
            globus.standin.add_fault(
                operation,
                status,
                probability=rate * part,
                drop=drop,
                hang=hang,
                retry_after=1 if status == 429 else None,
            )
        )
    for operation in READ_ONLY:
        installed.append(
            globus.standin.add_fault(
                operation, probability=rate * 0.1, hang=HANG_S, count=None
            )
        )
    return installed


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def test_fault_run(
    stress_hub: StressHub, stress_globus: StressGlobus, sizes: Sizes
) -> None:
    hub, globus = stress_hub, stress_globus
    globus.rotate_tokens()
    assert hub.rules() == [], "rules left over before the run"
    globus.standin.clear_calls()
    install_faults(globus, sizes.fault_rate)

    users = hub.users
    started = time.monotonic()
    outcomes = run_many(
        lambda i: submit(hub, users[i % len(users)], f"fault-{i}", i, timeout=90),
        sizes.requests,
        sizes.clients,
    )
    elapsed = time.monotonic() - started
    globus.standin.clear_faults()

    calls = globus.standin.calls()
    faulted = [c for c in calls if c["fault"]]
    problems = check_tasks(globus, outcomes)
    # a request that timed out while its submit call was on its way may have a
    # task (README: "the transfer may have started"); which requests meet that
    # depends on thread timing, so they are counted here and the case itself
    # is pinned down by test_a_submit_cut_by_the_deadline_keeps_its_rules
    timed_out_with_task = [
        entry
        for entry in problems["task of a failed request"]
        if entry.endswith(("(504 deadline_exceeded)", "(504 globus_timeout)"))
    ]
    problems["task of a failed request"] = [
        entry
        for entry in problems["task of a failed request"]
        if entry not in timed_out_with_task
    ]
    rules_made = sum(
        1 for c in calls if c["operation"] == "acl_add" and c["status"] in (200, 201)
    )
    settle_s = hub.try_settle("fault-")
    ledger = hub.ledger()

    created = [o for o in outcomes if o.kind == "created"]
    unexpected = [
        o
        for o in outcomes
        if o.kind != "created"
        and (o.kind != "error" or (o.status, o.answer["error"]) not in GLOBUS_ERRORS)
    ]
    no_retry_after = [
        o
        for o in outcomes
        if o.status == 503 and o.kind == "error" and "Retry-After" not in o.headers
    ]
    latencies = [o.seconds for o in outcomes]
    report(
        "fault run",
        [
            (
                "requests / clients / users",
                f"{len(outcomes)} / {sizes.clients} / {len(users)}",
            ),
            (
                "Globus calls / faulted",
                f"{len(calls)} / {len(faulted)} "
                f"({len(faulted) / max(1, len(calls)):.0%}, "
                f"asked {sizes.fault_rate:.0%})",
            ),
            ("faults by operation", histogram(c["operation"] for c in faulted)),
            ("answers", histogram(o.code for o in outcomes)),
            ("201 rate", f"{len(created) / max(1, len(outcomes)):.0%}"),
            (
                "latency p50 / p95 / max",
                f"{statistics.median(latencies):.2f}s / "
                f"{percentile(latencies, 0.95):.2f}s / {max(latencies):.2f}s",
            ),
            ("throughput", f"{len(outcomes) / elapsed:.1f} req/s over {elapsed:.1f}s"),
            ("rules created at Globus", rules_made),
            ("tasks problems", {k: len(v) for k, v in problems.items()}),
            ("timed-out requests with a task", len(timed_out_with_task)),
            (
                "rules left after tasks ended",
                f"{settled(settle_s)} (ledger: {ledger})",
            ),
        ],
    )

    assert not unexpected, [(o.label, o.code, o.answer, o.failure) for o in unexpected]
    assert not no_retry_after, [o.label for o in no_retry_after]
    assert all(not found for found in problems.values()), problems
    assert settle_s is not None, f"rules left after the tasks ended: {ledger}"
    assert ledger["pending"] == 0, ledger


# ----------------------------------------------------------------------
# targeted sequences


def drop_unknown_rules(hub: StressHub) -> int:
    """Remove stand-in rules the service does not know of, so a test that
    leaves one (a bug it reveals) does not spoil the parts after it."""
    state = hub.globus.standin.state
    with state.lock:
        rules = state.acl_rules.get(hub.collection, {})
        count = len(rules)
        rules.clear()
    return count


def ledger_emptied(hub: StressHub, timeout: float = 30.0) -> None:
    """End every task and wait until the ledger holds no rule and no task."""

    def empty() -> bool:
        hub.globus.end_tasks("")
        ledger = hub.ledger()
        return ledger["rules"] == 0 and ledger["active"] == 0

    wait_for("the ledger to empty", empty, timeout)


@pytest.fixture
def targeted(stress_hub: StressHub) -> t.Iterator[StressHub]:
    """A clean slate before and after each targeted case.

    After: faults off, one confirmed transfer (with a fresh token) to wake the
    reconciler for anything the ledger still holds, every task ended, and any
    rule the service does not know of removed from the stand-in, so that a bug
    one case reveals does not spoil the cases after it.
    """
    hub = stress_hub
    ledger_emptied(hub)
    drop_unknown_rules(hub)
    yield hub
    hub.globus.standin.clear_faults()
    hub.globus.standin.set_latency(0)
    try:
        user = hub.users[0]
        token = hub.globus.issue(user)
        wake = post_into_collection(hub, hub.book, user, "targeted-wake", token)
        assert wake.kind == "created", wake
        ledger_emptied(hub)
    finally:
        drop_unknown_rules(hub)


def post_into_collection(
    hub: StressHub, book: Book, user: str, label: str, token: str | None = None
) -> Outcome:
    document = transfer_document(
        token or hub.globus.token(user), user, label, 0, hub.collection
    )
    return call(
        book,
        "POST",
        hub.hub.service_url,
        label=label,
        user=user,
        token=hub.server_token(user),
        json=document,
        timeout=60,
    )


def test_a_timed_out_rule_request_leaves_no_rule_behind(
    targeted: StressHub, book: Book
) -> None:
    """Globus is slow to add a rule: both attempts time out, and both land at
    Globus later. The service answers an error, so it must not leave a rule
    that it no longer knows of (it would grant access for max_lifetime)."""
    hub = targeted
    hub.globus.standin.add_fault("acl_add", hang=HANG_S, count=2)
    outcome = post_into_collection(hub, book, hub.users[1], "slow-rule")
    assert outcome.kind == "error", outcome
    assert (outcome.status, outcome.answer["error"]) in GLOBUS_ERRORS, outcome

    # both delayed calls have landed by now; give the service time to act
    time.sleep(2 * HANG_S)
    leaked = hub.rules()
    report(
        "slow rule creation",
        [
            ("answer", outcome.code),
            ("rules at Globus 8 s later", len(leaked)),
            ("rules in the ledger", hub.ledger()["rules"]),
        ],
    )
    assert leaked == [], (
        "a rule created by a timed-out acl_add call outlives the request: "
        f"{[(r['principal'], r['path']) for r in leaked]}"
    )


def test_a_failed_revocation_is_retried_without_new_traffic(
    targeted: StressHub, book: Book
) -> None:
    """The submit is refused and deleting the fresh rule fails too (both
    attempts). The rule must still go soon, without waiting for some other
    transfer to wake the reconciler, and the caller must learn why the
    transfer failed (Globus refused it), not why the clean-up failed."""
    hub = targeted
    hub.globus.standin.add_fault(
        "submit_transfer", 400, code="ClientError.BadRequest", count=1
    )
    hub.globus.standin.add_fault("acl_delete", 503, count=2)
    outcome = post_into_collection(hub, book, hub.users[2], "refused")

    gone = None
    start = time.monotonic()
    while time.monotonic() - start < 10:
        if not hub.rules():
            gone = time.monotonic() - start
            break
        time.sleep(0.2)
    report(
        "failed revocation",
        [
            ("answer", outcome.code),
            ("rule revoked after", "never (10 s)" if gone is None else f"{gone:.1f}s"),
        ],
    )
    problems = []
    if outcome.kind != "error" or outcome.answer["error"] != "transfer_rejected":
        problems.append(f"answer {outcome.code}, expected 400 transfer_rejected")
    if gone is None:
        problems.append("the rule is still at Globus 10 s later")
    assert not problems, problems


def test_a_deadline_does_not_fail_requests_sharing_its_token_lookup(
    targeted: StressHub, book: Book
) -> None:
    """Two submissions of one user at once (the extension sends one per
    file) share one introspection of the user's token. When Globus Auth hangs
    past the first request's deadline, the second, whose own deadline has
    not passed, must still get a proper answer, not a 500."""
    hub = targeted
    user = hub.users[3]
    token = hub.globus.issue(user)  # fresh: its introspection is not cached
    book.secret(f"globus token of {user} (shared lookup)", token)
    hub.globus.standin.add_fault("introspect", hang=HANG_S, count=2)

    outcomes: list[Outcome] = []

    def later(i: int) -> Outcome:
        time.sleep(1.0 * i)
        return post_into_collection(hub, book, user, f"shared-{i}", token=token)

    outcomes = run_many(later, 2, 2)
    report(
        "shared token lookup past a deadline",
        [("answers", ", ".join(o.code for o in outcomes))],
    )
    first, second = outcomes
    assert first.kind == "error" and first.status == 504, first
    assert second.status != 500, (
        "the second request failed with 500 because the first one's deadline "
        f"cancelled the shared lookup: {second.answer}"
    )
    assert (second.status, second.answer["error"]) in GLOBUS_ERRORS, second


def test_a_user_can_submit_again_after_their_tasks_ended(
    targeted: StressHub, book: Book
) -> None:
    """Once a user's last task ends, the service retires (revokes) the refresh
    token it kept for them. Their next transfer, with the same Globus token as
    before, must still go through."""
    hub = targeted
    user = hub.users[4]
    token = hub.globus.issue(user)
    book.secret(f"globus token of {user} (again)", token)
    first = post_into_collection(hub, book, user, "again-1", token=token)
    assert first.kind == "created", first

    hub.globus.end_tasks("again-")
    retired_s = wait_for(
        "the task's rule revoked and the kept token retired",
        lambda: hub.ledger()["credentials"] == 0 and not hub.rules(),
        20,
    )
    second = post_into_collection(hub, book, user, "again-2", token=token)
    report(
        "submitting again after the tasks ended",
        [
            ("first", first.code),
            ("kept token retired after", f"{retired_s:.1f}s"),
            ("second, same Globus token", second.code),
        ],
    )
    assert second.kind == "created", (
        "the second transfer failed: the service used a cached Transfer token "
        f"that died with the retired refresh token: {second.answer}"
    )


def test_a_submit_cut_by_the_deadline_keeps_its_rules(
    targeted: StressHub, book: Book
) -> None:
    """The submit's first attempt times out; the retry reaches Globus but is
    answered only after the request's deadline. The caller gets 504 ("the
    transfer may have started") and Globus does start it. A task that runs
    must keep its rules until it ends: revoking them makes it fail for lack
    of access while nothing in the ledger tracks it."""
    hub = targeted
    user = hub.users[5 % len(hub.users)]
    standin = hub.globus.standin
    # first attempt: a hang past http_timeout that ends in a 503 (no task);
    # second: a hang that ends in the task being created, after the deadline
    standin.add_fault("submit_transfer", 503, hang=HANG_S, count=1)
    standin.add_fault("submit_transfer", hang=HANG_S, count=1)
    outcome = post_into_collection(hub, book, user, "cut-submit")
    assert outcome.kind == "error" and outcome.status == 504, outcome.code

    appeared = wait_for(
        "the late task to reach Globus",
        lambda: bool(hub.globus.tasks_by_label().get("cut-submit")),
        3 * HANG_S,
    )
    time.sleep(2.0)  # several reconciler sweeps
    task = hub.globus.tasks_by_label()["cut-submit"][0]
    folder = f"/{user}/inbox/0/"
    held = [r for r in hub.rules() if r["path"] == folder]
    report(
        "submit cut by the deadline",
        [
            ("answer", outcome.code),
            ("task at Globus", f"{task['status']}, {appeared:.1f}s after the answer"),
            ("its rule while it runs", "kept" if held else "revoked"),
            ("tracked in the ledger", hub.ledger()["active"]),
        ],
    )
    assert task["status"] == "ACTIVE"
    assert held, (
        "the task runs at Globus but its rule was revoked: the transfer will "
        "fail for lack of access, and the ledger does not track it"
    )


def test_a_failed_submit_waiting_for_the_users_lock_still_releases_its_rule(
    targeted: StressHub, book: Book
) -> None:
    """Globus refuses a submit while another transfer of the same user holds
    the user's rule lock (its rule request hangs). The refused one must still
    drop its rule once it has answered, even though its deadline passed while
    its clean-up waited for the lock; else the rule stays granted, for a
    transfer that never ran, until the pending submission is given up
    (AccessManager.pending_timeout, 10 min by default, 15 s here)."""
    hub = targeted
    user = hub.users[0]
    standin = hub.globus.standin
    token = hub.globus.token(user)
    # the refused submit answers slowly, so the other request takes the lock
    standin.add_fault("submit_transfer", 400, hang=2.0, count=1)

    def folder_rule(name: str) -> list[dict[str, t.Any]]:
        return [r for r in hub.rules() if r["path"] == f"/{user}/{name}/"]

    def refused() -> Outcome:
        document = transfer_document(token, user, "refused", 0, hub.collection)
        document["transfer"]["DATA"][0]["destination_path"] = f"/{user}/refused/f"
        return call(
            book,
            "POST",
            hub.hub.service_url,
            label="refused",
            token=hub.server_token(user),
            json=document,
            timeout=60,
        )

    def holder() -> Outcome:
        wait_for("the refused transfer's rule", lambda: bool(folder_rule("refused")), 5)
        # the holder's rule request hangs past its own deadline, lock held
        standin.add_fault("acl_add", hang=HANG_S, count=2)
        time.sleep(1.0)
        document = transfer_document(token, user, "holder", 0, hub.collection)
        document["transfer"]["DATA"][0]["destination_path"] = f"/{user}/holder/f"
        return call(
            book,
            "POST",
            hub.hub.service_url,
            label="holder",
            token=hub.server_token(user),
            json=document,
            timeout=60,
        )

    first, second = run_many(lambda i: (refused, holder)[i](), 2, 2)
    time.sleep(3.0)  # several reconciler sweeps after both answered
    left = folder_rule("refused")
    report(
        "refused submit behind a held lock",
        [
            ("refused transfer", first.code),
            ("lock holder", second.code),
            ("refused transfer's rule 3 s later", "granted" if left else "revoked"),
            ("ledger", hub.ledger()),
        ],
    )
    assert first.kind == "error", first.code
    assert not left, (
        "the refused transfer's rule is still granted: its clean-up was cut "
        "by the deadline while it waited for the user's lock"
    )
