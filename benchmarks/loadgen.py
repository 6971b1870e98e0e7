"""Load generator for ``bench_submit.py``, run as its own process.

Why a separate process: on a 2-core machine the generator competes with the
service for CPU; in its own process its cost is visible (the orchestrator reads
its CPU time from /proc) and it never shares an event loop or a GIL with the
code that measures the service.

Why a hand-written HTTP/1.1 client on asyncio streams: tornado's
``simple_httpclient`` opens a new connection per request and does a lot of
per-request bookkeeping; here each simulated connection is kept alive, like the
connection pool of a single-user server, and the generator spends a few tens of
microseconds per request, so the figures describe the proxy and the service.

Protocol: one JSON command per line on stdin, one JSON answer per line on
stdout. ``setup`` gives addresses, users and their tokens; ``run`` runs one
closed-loop phase (``concurrency`` workers, each sending its next request as
soon as its previous one answered) and answers with counts and percentiles.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import sys
import time
import typing as t

from hub_transfer.testing.documents import extension_body, item

# a transfer between two endpoints the hub collection is not: no ACL work
SOURCE = "ddb59aef-6d04-11e5-ba46-22000b92c6ec"
DESTINATION = "ddb59af0-6d04-11e5-ba46-22000b92c6ec"
# the service answers within its 20 s deadline; a request still open after
# this is counted as an error instead of stalling the run
REQUEST_TIMEOUT = 60.0


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:``port``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, bytes]:
        """Send one request and read its whole answer: (status, body)."""
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        fields: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()

        if "chunked" in fields.get("transfer-encoding", "").lower():
            data = await self._read_chunked()
        elif "content-length" in fields:
            data = await self.reader.readexactly(int(fields["content-length"]))
        else:
            data = await self.reader.read()
            self.close()
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, data

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append(await self.reader.readexactly(size + 2))
            if size == 0:
                # trailers end with an empty line, which the 0-size read consumed
                return b"".join(parts)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean (nearest-rank), in the unit given."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def rank(p: float) -> float:
        index = max(0, min(len(ordered) - 1, int(round(p * len(ordered))) - 1))
        return ordered[index]

    return {
        "n": len(ordered),
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


class LoadGenerator:
    """Holds the users and turns ``run`` commands into traffic."""

    def __init__(self, setup: dict[str, t.Any]) -> None:
        self.proxy_port = int(setup["proxy_port"])
        self.direct_port = int(setup["direct_port"])
        self.prefix = setup["prefix"]
        self.users = setup["users"]
        self.collection = setup.get("collection")
        self.counter = itertools.count()

    def transfer(self, user: str, acl: str | None, number: int) -> dict[str, t.Any]:
        """The document the extension sends; in ACL mode, into the collection.

        ``acl="new"`` puts every request's file in a directory of its own, so
        each needs a new rule; ``acl="reuse"`` always uses one directory, whose
        rule the first request made.
        """
        if acl is None:
            destination, path = DESTINATION, "~/"
        else:
            folder = f"r{number}" if acl == "new" else "shared"
            destination = self.collection
            path = f"/{user}/bench/{folder}/file1.txt"
        body = extension_body(
            None,
            source=SOURCE,
            destination=destination,
            items=[item("/share/godata/file1.txt", path)],
            label="bench" if acl is None else f"bench-{acl}",
        )
        return body["transfer"]

    def body(self, user: dict[str, str], acl: str | None) -> bytes:
        document = {
            "globus_token": user["globus_token"],
            "transfer": self.transfer(user["name"], acl, next(self.counter)),
        }
        return json.dumps(document).encode()

    async def run(self, command: dict[str, t.Any]) -> dict[str, t.Any]:
        """One closed-loop phase; see the module docstring."""
        concurrency = int(command["concurrency"])
        duration = command.get("duration")
        limit = command.get("requests")
        once = bool(command.get("once"))
        acl = command.get("acl")
        probe_interval = command.get("probe_interval")
        users = self.users[: command.get("users") or len(self.users)]

        # one fixed body per user unless each request must differ
        bodies = {u["name"]: self.body(u, acl) for u in users} if acl != "new" else {}
        queue: collections.deque[dict[str, str]] = collections.deque(users)
        picks = itertools.cycle(users)
        issued = 0
        latencies: list[float] = []
        statuses: collections.Counter[str] = collections.Counter()
        path = self.prefix

        connections = [HTTPConnection(self.proxy_port) for _ in range(concurrency)]
        await asyncio.gather(*(c.open() for c in connections))
        started = time.perf_counter()
        deadline = started + duration if duration else None

        def next_user() -> dict[str, str] | None:
            nonlocal issued
            if once:
                return queue.popleft() if queue else None
            if limit is not None and issued >= limit:
                return None
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            issued += 1
            return next(picks)

        async def worker(connection: HTTPConnection) -> None:
            while (user := next_user()) is not None:
                body = bodies.get(user["name"]) or self.body(user, acl)
                headers = {
                    "Authorization": f"Bearer {user['server_token']}",
                    "Content-Type": "application/json",
                }
                sent = time.perf_counter()
                try:
                    status, answer = await asyncio.wait_for(
                        connection.request("POST", path, headers, body),
                        REQUEST_TIMEOUT,
                    )
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    statuses[f"connection {type(exc).__name__}"] += 1
                    connection.close()
                    continue
                latencies.append(1000.0 * (time.perf_counter() - sent))
                statuses[_outcome(status, answer)] += 1

        probes: dict[str, list[float]] = {"direct": [], "proxy": []}
        stop_probe = asyncio.Event()
        probe = None
        if probe_interval:
            probe = asyncio.create_task(
                self.probe(float(probe_interval), probes, stop_probe, statuses)
            )
        lag = asyncio.create_task(self.loop_lag(stop_probe))

        cpu_before = time.process_time()
        if concurrency:
            await asyncio.gather(*(worker(c) for c in connections))
        else:
            # probes only: calibrates what the probes alone cost the service
            await asyncio.sleep(float(duration or 0))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
        stop_probe.set()
        if probe is not None:
            await probe
        lags = await lag
        for connection in connections:
            connection.close()

        ok = sum(n for s, n in statuses.items() if s.startswith("2"))
        return {
            "elapsed": elapsed,
            "requests": len(latencies),
            "ok": ok,
            "statuses": dict(statuses),
            "latency_ms": percentiles(latencies),
            "probe_direct_ms": percentiles(probes["direct"]),
            "probe_proxy_ms": percentiles(probes["proxy"]),
            "loadgen_cpu_s": cpu,
            "loadgen_lag_ms": percentiles(lags),
        }

    async def probe(
        self,
        interval: float,
        results: dict[str, list[float]],
        stop: asyncio.Event,
        statuses: collections.Counter[str],
    ) -> None:
        """GET api/health, directly and through the proxy, every ``interval``.

        The health handler touches neither the hub nor Globus, so its latency
        is the time the request waits for the service's event loop (direct) or
        for the proxy and then the loop (proxy).
        """
        targets = {
            "direct": HTTPConnection(self.direct_port),
            "proxy": HTTPConnection(self.proxy_port),
        }
        path = self.prefix + "api/health"
        try:
            while not stop.is_set():
                for name, connection in targets.items():
                    sent = time.perf_counter()
                    try:
                        status, _ = await asyncio.wait_for(
                            connection.request("GET", path, {}), REQUEST_TIMEOUT
                        )
                    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                        statuses[f"probe {name} {type(exc).__name__}"] += 1
                        connection.close()
                        continue
                    results[name].append(1000.0 * (time.perf_counter() - sent))
                    if status != 200:
                        statuses[f"probe {name} {status}"] += 1
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except TimeoutError:
                    pass
        finally:
            for connection in targets.values():
                connection.close()

    @staticmethod
    async def loop_lag(stop: asyncio.Event, interval: float = 0.01) -> list[float]:
        """How late this process's own loop wakes up: if the generator itself
        is starved of CPU, its latencies include that, and this shows it."""
        loop = asyncio.get_running_loop()
        lags = []
        while not stop.is_set():
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            lags.append(1000.0 * max(0.0, loop.time() - expected))
        return lags


def _outcome(status: int, answer: bytes) -> str:
    """``201``, or the status with the service's error code for failures."""
    if status < 300:
        return str(status)
    try:
        code = json.loads(answer).get("error", "")
    except (ValueError, AttributeError):
        code = "non-json"
    return f"{status} {code}".strip()


async def serve() -> None:
    """Answer commands from stdin until it closes or says ``quit``."""
    loop = asyncio.get_running_loop()
    generator: LoadGenerator | None = None
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        command = json.loads(line)
        if command["cmd"] == "quit":
            return
        if command["cmd"] == "setup":
            generator = LoadGenerator(command)
            answer: dict[str, t.Any] = {"ok": True}
        elif command["cmd"] == "run" and generator is not None:
            answer = await generator.run(command)
        else:
            answer = {"error": f"unknown command {command['cmd']!r}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(serve())
