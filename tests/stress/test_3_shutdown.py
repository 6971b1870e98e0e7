"""SIGTERM and SIGINT under load: the service stops cleanly, and in time.

JupyterHub stops its managed services with SIGINT (then SIGTERM); Kubernetes
sends SIGTERM. Either way the requests already in the service must get its
answer (a 201, or its JSON error), not a connection the proxy finds cut; the
process must exit with 0; and the hub then starts it again.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from hub_transfer.testing.localhub import wait_gone

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

# each Globus call takes this long, so a submission takes a second or two and
# many are in the service when the signal comes
LATENCY_S = 0.3
LOAD_BEFORE_S = 2.5
# a request counts as in the service at the signal if it started this long
# before it (reaching the service through the proxy takes milliseconds)
IN_FLIGHT_MARGIN_S = 0.2
EXIT_TIMEOUT_S = 20.0
# what configurable-http-proxy logs when its target drops a request it sent
CUT_MARKERS = ("socket hang up", "ECONNRESET")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_under_load(
    stress_hub: StressHub,
    stress_globus: StressGlobus,
    sizes: Sizes,
    sig: signal.Signals,
) -> None:
    hub, globus = stress_hub, stress_globus
    globus.rotate_tokens()
    assert hub.rules() == [], "rules left over before the run"
    prefix = f"stop-{sig.name.lower()}"
    globus.standin.set_latency(LATENCY_S)
    log_start = len(hub.hub.log_text())

    with Load(hub, prefix, sizes.shutdown_clients, max_seconds=120) as load:
        time.sleep(LOAD_BEFORE_S)
        pid = hub.hub.service_pid()
        assert pid is not None
        signalled = time.monotonic()
        os.kill(pid, sig)
        exit_s = wait_gone(pid, EXIT_TIMEOUT_S)
        assert exit_s is not None, f"the service still runs {EXIT_TIMEOUT_S}s later"
        hub.hub.wait_service_up(not_pid=pid)
        back_s = time.monotonic() - signalled
        time.sleep(1.0)
        outcomes = load.stop()
    globus.standin.set_latency(0)

    log = hub.hub.log_text()[log_start:]
    exited = re.findall(r"Service hub-transfer exited with status (-?\d+)", log)
    in_flight = [
        o
        for o in outcomes
        if o.started < signalled - IN_FLIGHT_MARGIN_S and o.ended > signalled
    ]
    cut = [o for o in in_flight if o.kind not in ("created", "error")]
    later = [o for o in outcomes if o.started >= signalled - IN_FLIGHT_MARGIN_S]
    proxy_cuts = sum(log.count(marker) for marker in CUT_MARKERS)
    problems = check_tasks(globus, outcomes)
    settle_s = hub.try_settle(prefix)
    report(
        f"shutdown by {sig.name}",
        [
            ("time to exit", f"{exit_s:.2f}s"),
            ("exit status (hub log)", ", ".join(exited) or "not logged"),
            ("service back after", f"{back_s:.1f}s"),
            ("requests in the service at the signal", len(in_flight)),
            ("their answers", histogram(o.code for o in in_flight)),
            ("requests after the signal", histogram(o.code for o in later)),
            ("connections the proxy saw cut", proxy_cuts),
            ("tasks problems", {k: len(v) for k, v in problems.items()}),
            ("rules left after tasks ended", settled(settle_s)),
        ],
    )

    assert in_flight, "no request was in flight at the signal: the test proves nothing"
    failures = []
    if exited != ["0"]:
        failures.append(f"exit status {exited}, expected 0")
    if "hub-transfer stopped" not in log:
        failures.append("no 'hub-transfer stopped' line")
    if "Traceback" in log:
        failures.append("a traceback in the log")
    if cut:
        failures.append(f"in-flight requests without the service's answer: {cut}")
    if proxy_cuts:
        failures.append(
            f"{proxy_cuts} request(s) the service had accepted were cut when it "
            "closed its connections (the proxy answered them with its error page)"
        )
    if problems["task of a failed request"]:
        failures.append(
            "Globus has a task for requests answered with an error: "
            f"{problems['task of a failed request']}"
        )
    if settle_s is None:
        failures.append("rules left after the tasks ended")
    if problems["201 without its task"] or problems["label with several tasks"]:
        failures.append(f"tasks: {problems}")
    assert not failures, failures
