"""Benchmark of a transfer submission through a real JupyterHub.

    python benchmarks/bench_submit.py [--short | --long] [--latency-ms 50]

What runs, each in its own process, all on 127.0.0.1:

* the Globus stand-in (``hub_transfer.testing.standin``), answering every
  Globus call after ``--latency-ms``;
* JupyterHub with configurable-http-proxy and hub-transfer as its managed
  service, started by ``LocalHub`` from the shipped config fragment;
* ``loadgen.py``, which sends the extension's exact request (the server's hub
  token as ``Authorization: Bearer``, ``{"globus_token", "transfer"}``) through
  the proxy, as N distinct hub users, at concurrency 1, 10, 50 and 100.

Why these figures: a warm submission should cost the service two Globus round
trips (submission id, submit) and little else, so p50 is compared with that
floor (2 x latency) and Globus calls are counted per successful request from
the stand-in's own call log. Service CPU per request comes from /proc, since on
a small machine CPU, not Globus, bounds throughput. A cheap GET sent alongside
the load shows whether the event loop stays responsive.

``--short`` (CI) asserts only correctness: no errors, exactly 2 Globus calls
per warm request (3 with a new ACL rule). Timing targets are printed with
PASS/MISS and never fail the run, since shared CI machines make them noisy.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import pstats
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
import typing as t
import urllib.request
import uuid

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from hub_transfer.testing.localhub import (  # noqa: E402
    GlobusSetup,
    LocalHub,
    proxy_on_path,
)

SERVICE_CONFIG = HERE / "service_config.py"
LOADGEN = HERE / "loadgen.py"
COLLECTION = str(uuid.uuid5(uuid.NAMESPACE_URL, "hub-transfer bench collection"))

# Globus operations a submission makes itself; any other logged call (task
# polling, rule deletion) is the reconciler's background work
REQUEST_OPERATIONS = (
    "introspect",
    "dependent_token",
    "client_credentials",
    "acl_list",
    "acl_get",
    "acl_add",
    "acl_update",
    "submission_id",
    "submit_transfer",
)
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
METRICS_TOKEN = secrets.token_hex(16)


@dataclasses.dataclass(frozen=True)
class Mode:
    """How long each phase lasts; ``--short`` must end within 3 minutes."""

    name: str
    users: int
    levels: tuple[int, ...]
    warm_seconds: float
    level_seconds: float
    acl_users: int
    acl_concurrency: int
    acl_seconds: float
    memory_checkpoints: tuple[int, ...] = ()


MODES = {
    "short": Mode("short", 100, (1, 10, 50, 100), 1.0, 6.0, 10, 10, 4.0),
    "default": Mode("default", 100, (1, 10, 50, 100), 3.0, 20.0, 20, 10, 15.0),
    "long": Mode(
        "long",
        100,
        (1, 10, 50, 100),
        3.0,
        30.0,
        20,
        10,
        20.0,
        tuple(range(10_000, 100_001, 10_000)),
    ),
}


# ----------------------------------------------------------------------
# /proc


def cpu_seconds(pid: int | None, part: str = "both") -> float:
    """User + system CPU of a whole process (all its threads, dead ones too)."""
    if not pid:
        return 0.0
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
    except OSError:
        return 0.0
    parts = fields.split()
    user, system = int(parts[11]), int(parts[12])
    ticks = {"user": user, "system": system}.get(part, user + system)
    return ticks / CLOCK_TICK


def main_thread_seconds(pid: int) -> float:
    """CPU of the process's main thread: for the service, its event loop."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    except OSError:
        return 0.0
    parts = fields.rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLOCK_TICK


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    parts = [int(v) for v in pathlib.Path("/proc/stat").read_text().split()[1:9]]
    idle = parts[3] + parts[4]
    return (sum(parts) - idle) / CLOCK_TICK, sum(parts) / CLOCK_TICK


def scrape(port: str, token: str) -> dict[tuple[str, str], float]:
    """The service's own Prometheus sums and counts, read directly (no proxy).

    Only ``*_sum`` and ``*_count`` series are kept, keyed by (name, labels):
    their differences across a phase give mean durations inside the service.
    """
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/services/hub-transfer/metrics",
        headers={"Authorization": f"Bearer {token}"},
    )
    with NO_PROXY.open(request, timeout=10) as response:
        text = response.read().decode()
    series = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        if name.endswith(("_sum", "_count")):
            series[(name, labels.rstrip("}"))] = float(value)
    return series


def mean_ms(
    before: dict[tuple[str, str], float],
    after: dict[tuple[str, str], float],
    base: str,
    labels: str,
) -> tuple[float, float]:
    """(count, mean ms) of a histogram between two scrapes."""
    count = after.get((base + "_count", labels), 0) - before.get(
        (base + "_count", labels), 0
    )
    total = after.get((base + "_sum", labels), 0) - before.get(
        (base + "_sum", labels), 0
    )
    return count, (1000 * total / count if count else 0.0)


class CPUWatch:
    """CPU used by each process of the set-up between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int | None], service: int) -> None:
        self.pids = pids
        self.service = service

    def start(self) -> None:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.loop_before = main_thread_seconds(self.service)
        self.system_before = cpu_seconds(self.service, "system")
        self.machine_before = machine_busy()
        self.wall = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.wall
        used = {
            name: cpu_seconds(pid) - self.before[name]
            for name, pid in self.pids.items()
        }
        used["service_loop"] = main_thread_seconds(self.service) - self.loop_before
        used["service_system"] = (
            cpu_seconds(self.service, "system") - self.system_before
        )
        busy, total = machine_busy()
        used["machine_busy"] = busy - self.machine_before[0]
        used["machine_total"] = total - self.machine_before[1]
        used["wall"] = wall
        return used


# ----------------------------------------------------------------------
# the load generator process


class LoadGen:
    """``loadgen.py`` as a child process, driven by JSON lines."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(LOADGEN)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, command: dict[str, t.Any], timeout: float) -> dict[str, t.Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"the load generator did not answer in {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def run(self, **command: t.Any) -> dict[str, t.Any]:
        limit = float(command.get("duration") or 0) + 180.0
        if command.get("requests"):
            limit += float(command["requests"]) / 20
        return self.send({"cmd": "run", **command}, limit)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.flush()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ----------------------------------------------------------------------
# one hub with its Globus stand-in, service and users


@dataclasses.dataclass
class Phase:
    """What one measured phase produced."""

    label: str
    floor_calls: int
    result: dict[str, t.Any]
    calls: dict[str, int]
    cpu: dict[str, float]
    rss: float
    metrics: tuple[dict, dict] | None = None
    probe_cpu_s: float = 0.0
    standin_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> int:
        return int(self.result["ok"])

    @property
    def errors(self) -> dict[str, int]:
        return {k: v for k, v in self.result["statuses"].items() if k[0] != "2"}

    @property
    def request_calls(self) -> int:
        return sum(self.calls.get(op, 0) for op in REQUEST_OPERATIONS)

    def calls_per_ok(self) -> float:
        return self.request_calls / self.ok if self.ok else float("nan")

    def service_cpu_ms(self) -> float:
        """Service CPU per successful request, probes' own cost taken out."""
        used = self.cpu["service"] - self.probe_cpu_s
        return 1000.0 * used / self.ok if self.ok else float("nan")

    def loop_cpu_ms(self) -> float:
        """The event-loop thread's share; the probes ran there too."""
        used = self.cpu["service_loop"] - self.probe_cpu_s
        return 1000.0 * used / self.ok if self.ok else float("nan")


class Rig:
    """Stand-in, hub, users and load generator for one series of phases."""

    def __init__(
        self,
        scratch: pathlib.Path,
        users: list[str],
        latency: float,
        service_env: dict[str, str],
        *,
        acl: bool = False,
    ) -> None:
        self.scratch = scratch
        self.users = users
        self.latency = latency
        self.acl = acl
        self.extra_env = service_env
        self.globus: GlobusSetup | None = None
        self.hub: LocalHub | None = None
        self.loadgen: LoadGen | None = None
        self.served = 0

    def start(self) -> None:
        started = time.monotonic()
        self.globus = GlobusSetup.start(
            self.users,
            client_name="hub-transfer bench",
            access_manager_of=[COLLECTION] if self.acl else (),
        )
        standin = self.globus.standin
        standin.set_latency(self.latency)
        if self.acl:
            # every "new rule" request leaves a rule: room for all of them
            standin.configure(acl_limit=1_000_000)

        env = self.globus.service_env()
        env.update(self.extra_env)
        env["HUB_TRANSFER_CONFIG_FILE"] = str(SERVICE_CONFIG)
        env["HUB_TRANSFER_METRICS_TOKEN"] = METRICS_TOKEN
        if self.acl:
            env.update(
                {
                    "GLOBUS_COLLECTION_ID": COLLECTION,
                    "HUB_TRANSFER_CRYPT_KEY": secrets.token_hex(32),
                    "HUB_TRANSFER_DB_URL": f"sqlite:///{self.scratch / 'acl.sqlite'}",
                    "HUB_TRANSFER_BENCH_MAX_RULES": "1000000",
                }
            )
        self.hub = LocalHub(self.scratch / "hub", users=self.users, service_env=env)
        self.hub.start()
        # one server at a time: JupyterHub 6.1 answers some concurrent API
        # spawns with a 500 ("Rolling back dirty objects"), even 4 at once
        server_tokens = [self.hub.server_token(user) for user in self.users]
        users = [
            {
                "name": user,
                "server_token": server_token,
                "globus_token": self.globus.token(user),
            }
            for user, server_token in zip(self.users, server_tokens, strict=True)
        ]
        self.loadgen = LoadGen()
        self.loadgen.send(
            {
                "cmd": "setup",
                "proxy_port": int(self.hub.env["LOCALHUB_PORT"]),
                "direct_port": int(self.hub.env["HUB_TRANSFER_PORT"]),
                "prefix": "/services/hub-transfer/",
                "users": users,
                "collection": COLLECTION,
            },
            30,
        )
        pid = self.hub.service_pid()
        if pid is None:
            raise RuntimeError("no service process under the hub")
        self.service_pid = pid
        proxy_pid_file = self.hub.scratch / "jupyterhub-proxy.pid"
        assert self.hub.proc is not None
        self.watch = CPUWatch(
            {
                "service": pid,
                "proxy": int(proxy_pid_file.read_text().strip()),
                "hub": self.hub.proc.pid,
                "standin": self.globus.standin.pid,
                "loadgen": self.loadgen.pid,
            },
            pid,
        )
        self.setup_seconds = time.monotonic() - started

    def stop(self) -> None:
        if self.loadgen is not None:
            self.loadgen.stop()
        if self.hub is not None:
            self.hub.stop()
        if self.globus is not None:
            self.globus.stop()

    def calls(self) -> tuple[dict[str, int], dict[str, float]]:
        """Calls per operation in the stand-in's log, and the mean ms its
        handler spent on each (the configured latency included)."""
        assert self.globus is not None
        counts: collections.Counter[str] = collections.Counter()
        seconds: dict[str, float] = collections.defaultdict(float)
        for call in self.globus.standin.calls():
            counts[call["operation"]] += 1
            seconds[call["operation"]] += float(call.get("duration") or 0.0)
        means = {op: 1000 * seconds[op] / n for op, n in counts.items()}
        return dict(counts), means

    def clear_calls(self) -> None:
        assert self.globus is not None
        self.globus.standin.clear_calls()

    def run(self, **command: t.Any) -> dict[str, t.Any]:
        assert self.loadgen is not None
        result = self.loadgen.run(**command)
        self.served += int(result["requests"])
        return result

    def measure(self, label: str, floor_calls: int, **command: t.Any) -> Phase:
        """One measured phase: call log cleared, CPU sampled around it."""
        self.clear_calls()
        before = self.scrape()
        self.watch.start()
        result = self.run(**command)
        cpu = self.watch.stop()
        after = self.scrape()
        counts, standin_ms = self.calls()
        return Phase(
            label,
            floor_calls,
            result,
            counts,
            cpu,
            rss_mib(self.service_pid),
            (before, after),
            standin_ms=standin_ms,
        )

    def scrape(self) -> dict[tuple[str, str], float]:
        assert self.hub is not None
        return scrape(self.hub.env["HUB_TRANSFER_PORT"], METRICS_TOKEN)

    def probe_cost(self, seconds: float, interval: float) -> dict[str, t.Any]:
        """Health GETs alone: their latency without load, and the service CPU
        seconds each costs (taken out of the loaded phase's CPU per request)."""
        self.watch.start()
        result = self.run(concurrency=0, duration=seconds, probe_interval=interval)
        cpu = self.watch.stop()
        probes = result["probe_direct_ms"]["n"] + result["probe_proxy_ms"]["n"]
        result["cpu_per_probe"] = cpu["service"] / probes if probes else 0.0
        return result


# ----------------------------------------------------------------------
# printing


def fmt_calls(phase: Phase) -> str:
    if not phase.ok:
        return "-"
    parts = [
        f"{op} {n / phase.ok:.3g}"
        for op, n in sorted(phase.calls.items())
        if op in REQUEST_OPERATIONS
    ]
    background = {
        op: n for op, n in phase.calls.items() if op not in REQUEST_OPERATIONS
    }
    text = ", ".join(parts)
    if background:
        text += " | background: " + ", ".join(f"{o} {n}" for o, n in background.items())
    return text


def time_split(phase: Phase) -> str:
    """Mean time of a submission inside the service, and in its Globus calls.

    Client mean minus service mean is the proxy's share (and the sockets');
    service mean minus the Globus calls is the service's own: CPU and waiting
    for the loop. The service times a Globus call from before it is handed to
    the thread pool, so a call's time includes waiting for a free worker.
    """
    assert phase.metrics is not None
    before, after = phase.metrics
    handled, inside = 0.0, 0.0
    for route in ("ServiceRootHandler", "TransfersHandler"):
        labels = f'method="POST",route="{route}"'
        n, mean = mean_ms(
            before, after, "hub_transfer_request_duration_seconds", labels
        )
        if n:
            handled, inside = handled + n, inside + n * mean
    inside = inside / handled if handled else 0.0
    calls = []
    globus = 0.0
    for key in sorted(after):
        name, labels = key
        if name != "hub_transfer_globus_call_duration_seconds_count":
            continue
        n, mean = mean_ms(
            before, after, "hub_transfer_globus_call_duration_seconds", labels
        )
        if n:
            op = labels.split('"')[1]
            calls.append(f"{op} {mean:.1f}")
            if handled:
                globus += n * mean / handled
    client = phase.result["latency_ms"].get("mean", 0.0)
    standin = ", ".join(
        f"{op} {ms:.1f}"
        for op, ms in sorted(phase.standin_ms.items())
        if op in REQUEST_OPERATIONS
    )
    return (
        f"mean ms: client {client:.1f} = proxy {client - inside:.1f} + service "
        f"{inside:.1f} (Globus calls {globus:.1f} + own {inside - globus:.1f})\n"
        f"{'':<22} per call as the service saw it, incl. wait for a worker "
        f"thread: {', '.join(calls)}\n"
        f"{'':<22} per call inside the stand-in's handler: {standin}"
    )


def print_phase(phase: Phase, latency_ms: float) -> None:
    lat = phase.result["latency_ms"]
    floor = phase.floor_calls * latency_ms
    rps = phase.result["requests"] / phase.result["elapsed"]
    cpu = phase.cpu
    wall = cpu["wall"] or 1.0
    errors = phase.errors
    ours = ("service", "proxy", "standin", "hub", "loadgen")
    others = max(0.0, cpu["machine_busy"] - sum(cpu[name] for name in ours))
    print(
        f"{phase.label:<22} {rps:7.1f} req/s  n={phase.result['requests']:<6} "
        f"p50 {lat.get('p50', 0):7.1f}  p95 {lat.get('p95', 0):7.1f}  "
        f"p99 {lat.get('p99', 0):7.1f} ms  "
        f"p50/floor {lat.get('p50', 0) / floor:5.2f} (floor {floor:g} ms)"
    )
    print(
        f"{'':<22} Globus calls per ok: {phase.calls_per_ok():.3f} ({fmt_calls(phase)})"
    )
    print(
        f"{'':<22} errors: "
        + (", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none")
    )
    print(
        f"{'':<22} service CPU {phase.service_cpu_ms():.2f} ms/ok "
        f"(loop thread {phase.loop_cpu_ms():.2f}, "
        f"kernel {1000 * cpu['service_system'] / max(phase.ok, 1):.2f}), "
        f"RSS {phase.rss:.1f} MiB | CPU% service {100 * cpu['service'] / wall:.0f}"
        f" proxy {100 * cpu['proxy'] / wall:.0f}"
        f" stand-in {100 * cpu['standin'] / wall:.0f}"
        f" hub {100 * cpu['hub'] / wall:.0f}"
        f" loadgen {100 * cpu['loadgen'] / wall:.0f}"
        f" other processes {100 * others / wall:.0f}"
        f" (machine {100 * cpu['machine_busy'] / wall:.0f}"
        f"/{100 * cpu['machine_total'] / wall:.0f})"
    )
    if phase.metrics is not None:
        print(f"{'':<22} {time_split(phase)}")
    for name in ("direct", "proxy"):
        probe = phase.result[f"probe_{name}_ms"]
        if probe.get("n"):
            print(
                f"{'':<22} health GET ({name}): p50 {probe['p50']:.2f}  "
                f"p99 {probe['p99']:.2f}  max {probe['max']:.2f} ms  n={probe['n']}"
            )
    lag = phase.result["loadgen_lag_ms"]
    if lag.get("n") and lag["p99"] > 5:
        print(f"{'':<22} note: load generator's own loop lag p99 {lag['p99']:.1f} ms")
    sys.stdout.flush()


def target(label: str, measured: str, goal: str, passed: bool | None) -> str:
    verdict = "n/a " if passed is None else ("PASS" if passed else "MISS")
    return f"  {verdict}  {label:<44} measured {measured:<22} target {goal}"


# ----------------------------------------------------------------------
# the runs


def experiment_env(args: argparse.Namespace) -> dict[str, str]:
    """Service settings a run changes to test a proposal (see --help)."""
    env = {}
    if args.max_workers:
        env["HUB_TRANSFER_BENCH_MAX_WORKERS"] = str(args.max_workers)
    if args.switch_interval:
        env["HUB_TRANSFER_BENCH_SWITCH_INTERVAL"] = str(args.switch_interval)
    if args.log_level:
        env["HUB_TRANSFER_BENCH_LOG_LEVEL"] = args.log_level
    if args.prototype:
        env["HUB_TRANSFER_BENCH_PROTOTYPE"] = args.prototype
    return env


def plain_series(args: argparse.Namespace, mode: Mode, scratch: pathlib.Path) -> dict:
    users = [f"u{i:03d}" for i in range(mode.users)]
    env = {"HUB_TRANSFER_BENCH_INTROSPECTION_TTL": str(args.introspection_ttl)}
    env.update(experiment_env(args))
    profile_dir = scratch / "profile-plain"
    if args.profile:
        profile_dir.mkdir()
        env["HUB_TRANSFER_BENCH_PROFILE"] = str(profile_dir)
    latency_ms = args.latency_ms
    rig = Rig(scratch / "plain", users, latency_ms / 1000, env)
    out: dict[str, t.Any] = {"levels": {}, "memory": []}
    try:
        rig.start()
        assert rig.hub is not None
        print(
            f"set-up: JupyterHub {rig.hub.version}, {len(users)} users with "
            f"servers, in {rig.setup_seconds:.1f} s; service pid {rig.service_pid}"
        )
        print()
        print(f"{'phase':<22} results (latency in ms through the proxy)")

        cold = rig.measure("cold (1st per user)", 4, concurrency=10, once=True)
        print_phase(cold, latency_ms)
        out["cold"] = cold

        for level in mode.levels:
            rig.run(concurrency=level, duration=mode.warm_seconds)
            probe = level == 50
            if probe:
                alone = rig.probe_cost(3.0, args.probe_interval)
                per_probe = alone["cpu_per_probe"]
                for name in ("direct", "proxy"):
                    quiet = alone[f"probe_{name}_ms"]
                    print(
                        f"health GET ({name}) without load: p50 {quiet['p50']:.2f}  "
                        f"p99 {quiet['p99']:.2f} ms  n={quiet['n']}"
                    )
            phase = rig.measure(
                f"warm c={level}",
                2,
                concurrency=level,
                duration=mode.level_seconds,
                probe_interval=args.probe_interval if probe else None,
            )
            if probe:
                count = (
                    phase.result["probe_direct_ms"]["n"]
                    + phase.result["probe_proxy_ms"]["n"]
                )
                phase.probe_cpu_s = per_probe * count
            print_phase(phase, latency_ms)
            if probe:
                print(
                    f"{'':<22} (CPU/ok excludes {count} health GETs at "
                    f"{1000 * per_probe:.2f} ms each, measured without load)"
                )
            out["levels"][level] = phase

        for checkpoint in mode.memory_checkpoints:
            left = checkpoint - rig.served
            if left > 0:
                result = rig.run(concurrency=50, requests=left)
                bad = {k: v for k, v in result["statuses"].items() if k[0] != "2"}
                out.setdefault("memory_errors", collections.Counter()).update(bad)
            rss = rss_mib(rig.service_pid)
            out["memory"].append((rig.served, rss))
            print(
                f"memory: service RSS {rss:.1f} MiB after {rig.served} requests "
                f"(load at c=50)"
            )
            sys.stdout.flush()

        if args.profile:
            print()
            profile(rig, profile_dir, args, "warm c=50", concurrency=50)
    finally:
        rig.stop()
    return out


def profile(
    rig: Rig,
    folder: pathlib.Path,
    args: argparse.Namespace,
    label: str,
    **command: t.Any,
) -> None:
    """Profile the service under load and print where its time goes."""
    rig.run(duration=2, **command)
    os.kill(rig.service_pid, signal.SIGUSR1)
    rig.watch.start()
    result = rig.run(duration=args.profile_seconds, **command)
    cpu = rig.watch.stop()
    os.kill(rig.service_pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not (folder / "done").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # this window's files go to a folder of their own, before the next window
    window = folder / "".join(ch if ch.isalnum() else "-" for ch in label)
    window.mkdir()
    for name in ("loop.prof", "globus_threads.prof", "done"):
        if (folder / name).exists():
            (folder / name).rename(window / name)
    folder = window
    ok = result["ok"]
    print(
        f"profile of {label} (cProfile on, so slower than above): "
        f"{args.profile_seconds:g} s, {ok} ok, service CPU "
        f"{1000 * cpu['service'] / max(ok, 1):.2f} ms/ok (loop thread "
        f"{1000 * cpu['service_loop'] / max(ok, 1):.2f})"
    )
    for name, title in (
        ("loop.prof", "event-loop thread"),
        ("globus_threads.prof", "Globus worker threads (inside executor work)"),
    ):
        path = folder / name
        if not path.exists():
            continue
        print(f"\n--- {title}: own time by component ---")
        print(by_component(pstats.Stats(str(path))))
        print(f"\n--- {title}: top by own time, then by cumulative ---")
        stats = pstats.Stats(str(path), stream=sys.stdout)
        stats.strip_dirs().sort_stats("tottime").print_stats(args.profile_top)
        stats.sort_stats("cumulative").print_stats(args.profile_top)
    print(f"profiles kept in {folder} (python -m pstats <file>)")


# C functions that release the GIL: their own time is the wait for the
# network (recv in a worker thread) or, under load, to take the GIL back
BLOCKING = ("poll", "send", "sendall", "recv", "recv_into", "write", "settimeout")


def component(filename: str, function: str) -> str:
    """Which package (or kind of C call) a profiled function belongs to."""
    if filename == "~":
        name = function.split("'")[1] if "'" in function else function
        if function.endswith("'select.epoll' objects}") and name == "poll":
            return "epoll wait (idle loop)"
        if "getaddrinfo" in function:
            return "blocking C call getaddrinfo"
        if name in BLOCKING or "register" in name:
            return f"blocking C call {name}"
        if "sqlite3" in function:
            return "sqlite3 (C)"
        return "other C built-ins"
    path = pathlib.Path(filename)
    parts = path.parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    if "hub_transfer" in parts:
        return "hub_transfer"
    if path.parent.name.startswith("python3"):
        return f"stdlib {path.stem}"
    if any(part.startswith("python3") for part in parts):
        return f"stdlib {path.parent.name}"
    return path.stem


def by_component(stats: pstats.Stats, top: int = 14) -> str:
    """Own time summed per component, largest first, with its share."""
    totals: collections.Counter[str] = collections.Counter()
    raw = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, function), (_cc, _nc, own, _cum, _callers) in raw.items():
        totals[component(filename, function)] += own
    grand = sum(totals.values()) or 1.0
    return "\n".join(
        f"  {seconds:8.3f} s {100 * seconds / grand:5.1f}%  {name}"
        for name, seconds in totals.most_common(top)
    )


def acl_series(args: argparse.Namespace, mode: Mode, scratch: pathlib.Path) -> dict:
    users = [f"a{i:03d}" for i in range(mode.acl_users)]
    env = {"HUB_TRANSFER_BENCH_INTROSPECTION_TTL": str(args.introspection_ttl)}
    env.update(experiment_env(args))
    profile_dir = scratch / "profile-acl"
    if args.profile:
        profile_dir.mkdir()
        env["HUB_TRANSFER_BENCH_PROFILE"] = str(profile_dir)
    latency_ms = args.latency_ms
    rig = Rig(scratch / "acl", users, latency_ms / 1000, env, acl=True)
    out: dict[str, t.Any] = {}
    try:
        rig.start()
        print(
            f"set-up: ACL mode on collection {COLLECTION[:8]}..., "
            f"{len(users)} users, in {rig.setup_seconds:.1f} s"
        )
        # first request per user: introspection, dependent grant, the service's
        # own token (once) and the user's shared rule
        cold = rig.measure(
            "ACL cold", 5, concurrency=mode.acl_concurrency, once=True, acl="reuse"
        )
        print_phase(cold, latency_ms)
        out["cold"] = cold
        c = mode.acl_concurrency
        rig.run(concurrency=c, duration=mode.warm_seconds, acl="reuse")
        for kind, floor in (("reuse", 2), ("new", 3)):
            phase = rig.measure(
                f"ACL {kind} rule c={c}",
                floor,
                concurrency=c,
                duration=mode.acl_seconds,
                acl=kind,
                probe_interval=args.probe_interval,
            )
            print_phase(phase, latency_ms)
            out[kind] = phase
        if args.profile:
            for kind in ("reuse", "new"):
                print()
                label = f"ACL {kind} rule c={c}"
                profile(rig, profile_dir, args, label, concurrency=c, acl=kind)
    finally:
        rig.stop()
    return out


def summarize(
    args: argparse.Namespace, mode: Mode, plain: dict, acl: dict | None
) -> list[str]:
    """Print targets next to the figures; return correctness failures."""
    latency_ms = args.latency_ms
    failures: list[str] = []
    lines = []
    levels: dict[int, Phase] = plain["levels"]

    phases: list[Phase] = [plain["cold"], *levels.values()]
    if acl:
        phases += [acl["cold"], acl["reuse"], acl["new"]]
    for phase in phases:
        if phase.errors:
            failures.append(f"{phase.label}: errors {phase.errors}")
        if phase.ok == 0:
            failures.append(f"{phase.label}: no successful request")
    if plain.get("memory_errors"):
        failures.append(f"memory run: errors {dict(plain['memory_errors'])}")

    for level, phase in levels.items():
        exact = phase.request_calls == 2 * phase.ok
        lines.append(
            target(
                f"Globus calls per warm request, c={level}",
                f"{phase.calls_per_ok():.3f}",
                "exactly 2",
                exact,
            )
        )
        if not exact:
            failures.append(
                f"{phase.label}: {phase.request_calls} Globus calls for "
                f"{phase.ok} requests ({phase.calls})"
            )
    if acl:
        for kind, floor in (("reuse", 2), ("new", 3)):
            phase = acl[kind]
            exact = phase.request_calls == floor * phase.ok
            lines.append(
                target(
                    f"Globus calls per request, ACL {kind} rule",
                    f"{phase.calls_per_ok():.3f}",
                    f"exactly {floor}",
                    exact,
                )
            )
            if not exact:
                failures.append(f"ACL {kind}: calls {phase.calls} for {phase.ok} ok")

    if 1 in levels:
        p50 = levels[1].result["latency_ms"]["p50"]
        over = p50 - 2 * latency_ms
        lines.append(
            target(
                "p50 at c=1 minus floor (2 x latency)",
                f"{over:+.1f} ms (p50 {p50:.1f})",
                "<= 15 ms",
                over <= 15,
            )
        )
    for level, phase in levels.items():
        cpu = phase.service_cpu_ms()
        lines.append(
            target(
                f"service CPU per warm request, c={level}",
                f"{cpu:.2f} ms",
                "<= 3 ms",
                cpu <= 3,
            )
        )
    if 50 in levels:
        phase = levels[50]
        for name in ("direct", "proxy"):
            probe = phase.result[f"probe_{name}_ms"]
            if probe.get("n"):
                lines.append(
                    target(
                        f"health GET p99 at c=50 ({name})",
                        f"{probe['p99']:.2f} ms",
                        "< 10 ms",
                        probe["p99"] < 10,
                    )
                )
    memory = plain["memory"]
    if len(memory) >= 2:
        (n1, r1), (n2, r2) = memory[0], memory[-1]
        growth = 100 * (r2 - r1) / r1
        lines.append(
            target(
                f"RSS growth {n1} -> {n2} requests",
                f"{growth:+.1f}% ({r1:.0f}->{r2:.0f} MiB)",
                "< 10%",
                growth < 10,
            )
        )
    else:
        lines.append(
            target("RSS growth 10k -> 100k requests", "(only in --long)", "< 10%", None)
        )
    print("\nTargets (timing targets are reported, never enforced):")
    print("\n".join(lines))
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--short", action="store_true", help="CI: about 2 minutes")
    size.add_argument("--long", action="store_true", help="adds the 100k memory run")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument(
        "--introspection-ttl",
        type=float,
        default=3600.0,
        help="TransferSubmitter.introspection_ttl for the run (service default "
        "30 s); the default keeps every level's warm path warm",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=0,
        help="TransferSubmitter.max_workers (0: the service default, 16)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=0.0,
        help="experiment: sys.setswitchinterval() in the service (default 0.005)",
    )
    parser.add_argument(
        "--log-level",
        default="",
        help="experiment: the service's log level, e.g. WARN (default INFO: two "
        "lines per request)",
    )
    parser.add_argument(
        "--prototype",
        choices=("one_job", "async"),
        help="experiment: replace the service's submit with a prototype from "
        "benchmarks/prototypes.py",
    )
    parser.add_argument(
        "--levels",
        default="",
        help="comma-separated concurrency levels instead of 1,10,50,100",
    )
    parser.add_argument("--probe-interval", type=float, default=0.02)
    parser.add_argument("--no-acl", action="store_true", help="skip the ACL variant")
    parser.add_argument(
        "--profile", action="store_true", help="then profile the service at c=50"
    )
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--profile-top", type=int, default=25)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = MODES["short" if args.short else "long" if args.long else "default"]
    if args.levels:
        levels = tuple(int(level) for level in args.levels.split(","))
        mode = dataclasses.replace(mode, levels=levels)
    if proxy_on_path() is None:
        print("configurable-http-proxy is not on PATH (run scripts/setup.sh and add")
        print(".tools/node_modules/.bin to PATH)")
        return 2
    started = time.monotonic()
    print(f"bench_submit --{mode.name}: {platform.python_version()}, ", end="")
    print(f"{os.cpu_count()} CPUs, Globus latency {args.latency_ms:g} ms per call")
    print(
        "service settings for the benchmark (benchmarks/service_config.py): "
        "UserLimits raised to 100000 in flight and 10000000/minute per user "
        "(defaults 4 and 60 would answer 429); "
        f"TransferSubmitter.introspection_ttl {args.introspection_ttl:g} s "
        "(default 30)"
    )
    for name, value in experiment_env(args).items():
        print(f"EXPERIMENT: {name}={value} (not a default of the service)")
    print(
        f"levels {', '.join(map(str, mode.levels))}: {mode.warm_seconds:g} s "
        f"warm-up, then {mode.level_seconds:g} s measured; users rotate per "
        "request; floor = latency x Globus calls the path needs"
    )
    with tempfile.TemporaryDirectory(prefix="bench-submit-") as tmp:
        scratch = pathlib.Path(tmp)
        if args.profile:
            # keep the profiles after the run
            scratch = pathlib.Path(tempfile.mkdtemp(prefix="bench-submit-profile-"))
        plain = plain_series(args, mode, scratch)
        acl = None
        if not args.no_acl:
            print()
            acl = acl_series(args, mode, scratch)
    failures = summarize(args, mode, plain, acl)
    print(f"\ntook {time.monotonic() - started:.0f} s")
    if failures:
        print("\nCORRECTNESS FAILED:")
        print("\n".join(f"  {f}" for f in failures))
        return 1
    print("correctness: OK (no errors; Globus calls per warm request as required)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
