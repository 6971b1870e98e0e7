"""hub-transfer config file for the benchmark (``HUB_TRANSFER_CONFIG_FILE``).

Not imported: the service executes it as its traitlets config, inside the
service process, before the application is built. The benchmark needs it for
two reasons:

* Limits. ``UserLimits`` (4 in flight, 60 a minute per hub user) exist to stop
  one user crowding out the rest; a load generator is exactly such a user and
  would measure 429s. They are raised here, and the benchmark says so.
* Caches. ``introspection_ttl`` (default 30 s) is read from
  ``HUB_TRANSFER_BENCH_INTROSPECTION_TTL`` so a run can keep the warm path
  warm (the benchmark's default) or measure the default's re-introspections.
* Experiments, each off unless its variable is set: ``max_workers``, the log
  level, the interpreter's GIL switch interval, and a prototype from
  ``prototypes.py``, to measure what a proposed change to the service would
  buy before it is made.

With ``HUB_TRANSFER_BENCH_PROFILE`` set to a directory, it also installs a
profiler that the benchmark switches on and off with signals, so only the
measured window is profiled (not start-up or warm-up):

* SIGUSR1 starts ``cProfile`` on the main thread (the event loop) and around
  every work item of every ``ThreadPoolExecutor`` (the Globus calls); each
  worker thread has its own profiler, enabled and disabled on that thread, as
  cProfile requires.
* SIGUSR2 stops and writes ``loop.prof`` and ``globus_threads.prof`` there.

py-spy would do this from outside without touching the process; it is not
installed, and this needs nothing beyond the standard library.
"""

import cProfile
import os
import pathlib
import pstats
import signal
import sys
import threading
from concurrent.futures import thread as _futures_thread

c = get_config()  # type: ignore[name-defined]  # noqa: F821

c.UserLimits.max_concurrent = int(
    os.environ.get("HUB_TRANSFER_BENCH_MAX_CONCURRENT", "100000")
)
c.UserLimits.per_minute = int(
    os.environ.get("HUB_TRANSFER_BENCH_PER_MINUTE", "10000000")
)

if os.environ.get("HUB_TRANSFER_BENCH_INTROSPECTION_TTL"):
    c.TransferSubmitter.introspection_ttl = float(
        os.environ["HUB_TRANSFER_BENCH_INTROSPECTION_TTL"]
    )
if os.environ.get("HUB_TRANSFER_BENCH_MAX_WORKERS"):
    c.TransferSubmitter.max_workers = int(os.environ["HUB_TRANSFER_BENCH_MAX_WORKERS"])
if os.environ.get("HUB_TRANSFER_BENCH_LOG_LEVEL"):
    c.Application.log_level = os.environ["HUB_TRANSFER_BENCH_LOG_LEVEL"]
if os.environ.get("HUB_TRANSFER_BENCH_SWITCH_INTERVAL"):
    # an experiment, not a setting of the service: how much of the loop's
    # latency is waiting to get the GIL back from the Globus worker threads
    sys.setswitchinterval(float(os.environ["HUB_TRANSFER_BENCH_SWITCH_INTERVAL"]))
if os.environ.get("HUB_TRANSFER_BENCH_PROTOTYPE"):
    # a proposed change to the service, prototyped in prototypes.py
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import prototypes

    prototypes.install(os.environ["HUB_TRANSFER_BENCH_PROTOTYPE"])
if os.environ.get("HUB_TRANSFER_BENCH_MAX_RULES"):
    # the "new rule" variant leaves a rule per request: room for all of them
    c.AccessManager.max_rules = int(os.environ["HUB_TRANSFER_BENCH_MAX_RULES"])
    c.AccessManager.max_rules_per_user = int(os.environ["HUB_TRANSFER_BENCH_MAX_RULES"])


def _install_profiler(folder: pathlib.Path) -> None:
    """Signal-driven profiling of the loop and of the executor's work items.

    Each SIGUSR1 starts fresh profilers, so several windows of one service
    (say two ACL variants) are profiled apart; the benchmark moves each
    window's files away before the next.
    """
    current: dict = {"on": False, "loop": None, "workers": {}}
    original_run = _futures_thread._WorkItem.run

    def run(self):  # type: ignore[no-untyped-def]
        workers = current["workers"]
        if not current["on"]:
            return original_run(self)
        ident = threading.get_ident()
        profile = workers.get(ident)
        if profile is None:
            profile = workers[ident] = cProfile.Profile()
        profile.enable()
        try:
            return original_run(self)
        finally:
            profile.disable()

    _futures_thread._WorkItem.run = run

    def start(signum, frame):  # type: ignore[no-untyped-def]
        current["loop"] = cProfile.Profile()
        current["workers"] = {}
        current["on"] = True
        current["loop"].enable()

    def stop(signum, frame):  # type: ignore[no-untyped-def]
        current["on"] = False
        current["loop"].disable()
        current["loop"].dump_stats(str(folder / "loop.prof"))
        profiles = list(current["workers"].values())
        if profiles:
            # the load has ended before this signal, so no work item is running
            # and each worker's profiler is disabled while they are combined
            stats = pstats.Stats(profiles[0])
            for other in profiles[1:]:
                stats.add(other)
            stats.dump_stats(str(folder / "globus_threads.prof"))
        (folder / "done").write_text("ok")

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


if os.environ.get("HUB_TRANSFER_BENCH_PROFILE"):
    _install_profiler(pathlib.Path(os.environ["HUB_TRANSFER_BENCH_PROFILE"]))
