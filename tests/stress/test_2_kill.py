"""The service is SIGKILLed again and again under load; the hub restarts it.

SIGKILL leaves the process no chance to tidy up, so everything rests on the
order in which the ledger and Globus are written. Requests cut by a kill get
the proxy's error page, which is expected; what must hold afterwards is that
every 201 has its task, no submission became two tasks, and once the tasks
end not one rule is left, at Globus or in the ledger.
"""

from __future__ import annotations

import signal
import time

from .conftest import (
    Load,
    Sizes,
    StressGlobus,
    StressHub,
    check_tasks,
    histogram,
    report,
    settled,
)

# a little Globus latency widens the windows in which a kill lands mid-request
LATENCY_S = 0.05
# load on each new process before it is killed again
LIFETIME_S = 1.5


def test_kill_run(
    stress_hub: StressHub, stress_globus: StressGlobus, sizes: Sizes
) -> None:
    hub, globus = stress_hub, stress_globus
    globus.rotate_tokens()
    assert hub.rules() == [], "rules left over before the run"
    log_start = len(hub.hub.log_text())
    globus.standin.set_latency(LATENCY_S)

    restarts: list[float] = []
    started = time.monotonic()
    with Load(hub, "kill", sizes.kill_clients, max_seconds=240) as load:
        time.sleep(LIFETIME_S)
        for _ in range(sizes.kills):
            killed_at = time.monotonic()
            old = hub.hub.kill_service(signal.SIGKILL)
            hub.hub.wait_service_up(not_pid=old)
            restarts.append(time.monotonic() - killed_at)
            time.sleep(LIFETIME_S)
        outcomes = load.stop()
    elapsed = time.monotonic() - started
    globus.standin.set_latency(0)

    problems = check_tasks(globus, outcomes)
    tasks = globus.tasks_by_label()
    unanswered_tasks = [
        o.label for o in outcomes if o.kind != "created" and tasks.get(o.label)
    ]
    settle_s = hub.try_settle("kill-")
    ledger = hub.ledger()
    log = hub.hub.log_text()[log_start:]
    recoveries = log.count("Recovered the ledger")
    report(
        "kill run",
        [
            ("kills (SIGKILL)", f"{len(restarts)} in {elapsed:.1f}s"),
            (
                "restart time min / max",
                f"{min(restarts):.1f}s / {max(restarts):.1f}s" if restarts else "-",
            ),
            ("requests / clients", f"{len(outcomes)} / {sizes.kill_clients}"),
            ("answers", histogram(o.code for o in outcomes)),
            ("tasks of cut requests", len(unanswered_tasks)),
            ("tasks problems", {k: len(v) for k, v in problems.items()}),
            ("recoveries logged", recoveries),
            ("rules left after tasks ended", settled(settle_s)),
            ("ledger after", ledger),
        ],
    )

    created = [o for o in outcomes if o.kind == "created"]
    assert created, "no transfer got through at all"
    assert not problems["201 without its task"], problems
    assert not problems["label with several tasks"], problems
    assert not problems["task of a failed request"], problems
    assert settle_s is not None, f"rules left after the tasks ended: {ledger}"
    assert ledger["pending"] == 0, ledger
    assert recoveries == len(restarts), f"{recoveries} recoveries logged"
    assert log.count("Service hub-transfer exited with status -9") == len(restarts)
