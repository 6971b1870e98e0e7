"""The robustness suite: a real hub in ACL mode, the stand-in, many clients.

It takes minutes and starts several processes, so ``pytest tests`` does not
collect it. Run it on its own::

    pytest tests/stress            # or: HUB_TRANSFER_STRESS=1 pytest tests

Sizes come from environment variables, ``HUB_TRANSFER_STRESS_<FIELD>`` for
each field of :class:`Sizes` (``..._REQUESTS=300``, ``..._CLIENTS=12``,
``..._USERS=6``, ``..._FAULT_RATE=0.2``, ``..._KILLS=5``, ``..._KILL_CLIENTS=8``,
``..._SHUTDOWN_CLIENTS=8``, ``..._SEED``); ``HUB_PYTHON`` picks the hub's
interpreter as for the end-to-end tests. Every part prints its figures in a
short table at the end of the run, whether or not output is captured, and
asserts only correctness.

Why the stand-in runs in this process (``StandInThread``) rather than as a
subprocess: the secrets check must know every token it issued, refresh tokens
included, and only its in-memory state lists them.

The parts share one session-wide hub (``stress_hub``) and run in file order:
faults, kills, shutdown, hostile callers (on a hub of their own, with the
default limits), then the secrets check over everything the others produced.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import sqlite3
import sys
import threading
import time
import typing as t
import uuid

import pytest
import requests

from hub_transfer.testing.localhub import LocalHub, LocalHubError, http, proxy_on_path
from hub_transfer.testing.standin import StandInThread
from hub_transfer.testing.standin_state import StandInState

HERE = pathlib.Path(__file__).resolve().parent
STRESS_SWITCH = "HUB_TRANSFER_STRESS"

STRESS_COLLECTION = str(uuid.UUID(int=0x57E55_0001))
HOSTILE_COLLECTION = str(uuid.UUID(int=0x57E55_0002))
ELSEWHERE_SOURCE = str(uuid.UUID(int=0x57E55_0A01))
ELSEWHERE_DESTINATION = str(uuid.UUID(int=0x57E55_0A02))
CRYPT_KEY = "a7" * 32
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")

# the service's settings on the stress hub: short Globus timeouts so that hangs
# cost seconds, not minutes, and limits out of the way of the load; as with the
# defaults, a call that times out and is retried outlives the request's deadline
STRESS_CONFIG = """\
c.AccessManager.poll_interval = 0.5
c.AccessManager.max_poll_interval = 1
c.TransferSubmitter.http_timeout = 3
c.HubTransferApp.request_timeout = 6
c.UserLimits.max_concurrent = 1000
c.UserLimits.per_minute = 100000
# a submission left pending (its clean-up cut short) is settled after this,
# not after the default 10 min; still well over request_timeout, so a live
# submission is never taken for an abandoned one
c.AccessManager.pending_timeout = 15
"""


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each part is; ``HUB_TRANSFER_STRESS_<FIELD>`` overrides."""

    requests: int = 300
    clients: int = 12
    users: int = 6
    fault_rate: float = 0.2
    kills: int = 5
    kill_clients: int = 8
    shutdown_clients: int = 8
    seed: int = 20261204

    @classmethod
    def from_env(cls) -> Sizes:
        values = {}
        for field in dataclasses.fields(cls):
            name = f"HUB_TRANSFER_STRESS_{field.name.upper()}"
            default = field.default
            number = _env_number(name, float(default))  # type: ignore[arg-type]
            values[field.name] = type(default)(number)  # type: ignore[operator]
        return cls(**values)

    def user_names(self) -> tuple[str, ...]:
        count = max(1, self.users)
        extra = tuple(f"user{i}" for i in range(len(NAMES), count))
        return (NAMES + extra)[:count]


# ----------------------------------------------------------------------
# collection: only when asked for


def _selected(config: pytest.Config) -> bool:
    if os.environ.get(STRESS_SWITCH) == "1":
        return True
    for arg in config.args:
        path = pathlib.Path(str(arg).split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(
    collection_path: pathlib.Path, config: pytest.Config
) -> bool | None:
    """Leave the suite out of ``pytest tests`` unless named or switched on."""
    if collection_path.name.startswith("test_") and not _selected(config):
        return True
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in pathlib.Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.stress)


# ----------------------------------------------------------------------
# figures


FIGURES: list[tuple[str, list[tuple[str, t.Any]]]] = []


def report(title: str, rows: t.Iterable[tuple[str, t.Any]]) -> None:
    """Keep a table of figures for the end of the run."""
    FIGURES.append((title, list(rows)))


def pytest_terminal_summary(terminalreporter: t.Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("hub-transfer stress figures")
    for title, rows in FIGURES:
        terminalreporter.write_line(f"{title}")
        width = max((len(name) for name, _ in rows), default=0)
        for name, value in rows:
            terminalreporter.write_line(f"  {name.ljust(width)}  {value}")


def settled(seconds: float | None) -> str:
    return "some, 60 s on" if seconds is None else f"0 after {seconds:.1f}s"


def histogram(values: t.Iterable[t.Any]) -> str:
    counts = collections.Counter(values)
    return ", ".join(f"{key}: {counts[key]}" for key in sorted(counts, key=str))


# ----------------------------------------------------------------------
# waiting


def wait_for(what: str, check: t.Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout:g} s")


# ----------------------------------------------------------------------
# Globus


class StressGlobus:
    """The stand-in (in a thread of this process), the service's client and
    one Globus identity per hub user."""

    def __init__(
        self, users: t.Iterable[str], collections: t.Iterable[str], seed: int
    ) -> None:
        self.standin = StandInThread(StandInState(random_seed=seed))
        self.standin.start()
        client = self.standin.create_client(
            name="hub-transfer stress", access_manager_of=list(collections)
        )
        self.client_id = str(client["client_id"])
        self.client_secret = str(client["client_secret"])
        self.scope = str(client["scope"])
        self.identities: dict[str, str] = {}
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        for user in users:
            self.add_identity(user)

    def add_identity(self, user: str) -> str:
        if user not in self.identities:
            made = self.standin.create_identity(f"{user}@example.org")
            self.identities[user] = str(made["id"])
        return self.identities[user]

    def stop(self) -> None:
        self.standin.stop()

    def service_env(self) -> dict[str, str]:
        env = self.standin.env()
        env.update(
            {
                "GLOBUS_CLIENT_ID": self.client_id,
                "GLOBUS_CLIENT_SECRET": self.client_secret,
                "GLOBUS_TRANSFER_SUBMISSION_SCOPE": self.scope,
            }
        )
        return env

    def token(self, user: str) -> str:
        """The Globus token the user's JupyterLab extension holds (one each)."""
        with self._lock:
            if user not in self._tokens:
                self._tokens[user] = self.issue(user)
            return self._tokens[user]

    def rotate_tokens(self) -> None:
        """Give every user a new Globus token, as after a new Globus login.

        Each part starts with fresh tokens so that what an earlier part did to
        the old ones (and to the service's caches of them) cannot decide it.
        """
        with self._lock:
            self._tokens.clear()

    def issue(self, user: str, **options: t.Any) -> str:
        """A new token of ``user``'s identity (our scope unless told otherwise)."""
        options.setdefault("scope", self.scope)
        answer = self.standin.issue_token(self.add_identity(user), **options)
        return str(answer["access_token"])

    def rules(self, collection: str) -> list[dict[str, t.Any]]:
        return list(self.standin.acl_rules(collection))

    def tasks_by_label(self) -> dict[str, list[dict[str, t.Any]]]:
        found: dict[str, list[dict[str, t.Any]]] = collections.defaultdict(list)
        for task in self.standin.tasks():
            found[str(task.get("label"))].append(task)
        return found

    def end_tasks(self, prefix: str, status: str = "SUCCEEDED") -> int:
        """Finish every running task whose label starts with ``prefix``."""
        ended = 0
        for task in self.standin.tasks():
            label = str(task.get("label") or "")
            if label.startswith(prefix) and task["status"] == "ACTIVE":
                self.standin.set_task_status(task["task_id"], status)
                ended += 1
        return ended

    def issued_secrets(self) -> dict[str, str]:
        """Every access and refresh token the stand-in ever issued."""
        state = self.standin.state
        with state.lock:
            found = {f"globus access token {v[:6]}": v for v in state.tokens}
            found.update(
                {f"globus refresh token {v[:6]}": v for v in state.refresh_tokens}
            )
        return found


@pytest.fixture(scope="session")
def sizes() -> Sizes:
    return Sizes.from_env()


@pytest.fixture(scope="session", autouse=True)
def quiet_standin_log() -> t.Iterator[None]:
    """The stand-in serves from this process: its access log (thousands of
    faulted calls, by design) would bury any real failure's output."""
    logger = logging.getLogger("tornado.access")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="session")
def stress_globus(sizes: Sizes, book: Book) -> t.Iterator[StressGlobus]:
    globus = StressGlobus(
        sizes.user_names(), [STRESS_COLLECTION, HOSTILE_COLLECTION], sizes.seed
    )
    book.secret("globus client secret", globus.client_secret)
    try:
        yield globus
    finally:
        globus.stop()


# ----------------------------------------------------------------------
# what the secrets check needs: every secret used, every answer, every log


class Book:
    """Secrets in use and everything that might leak them (thread-safe)."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.bodies: list[str] = []
        self.files: dict[str, pathlib.Path] = {}
        self._lock = threading.Lock()

    def secret(self, name: str, value: str) -> None:
        if value:
            with self._lock:
                self.secrets[name] = value

    def body(self, text: str) -> None:
        with self._lock:
            self.bodies.append(text)

    def file(self, name: str, path: pathlib.Path) -> None:
        with self._lock:
            self.files[name] = path


@pytest.fixture(scope="session")
def book() -> Book:
    return Book()


# ----------------------------------------------------------------------
# the hub


class StressHub:
    """A LocalHub in ACL mode with one collection, its ledger and its users."""

    def __init__(
        self,
        scratch: pathlib.Path,
        globus: StressGlobus,
        book: Book,
        *,
        users: t.Sequence[str],
        collection: str,
        config: str,
    ) -> None:
        self.globus = globus
        self.book = book
        self.collection = collection
        self.users = tuple(users)
        self.ledger_path = scratch / "ledger.sqlite"
        config_path = scratch / "hub_transfer_config.py"
        scratch.mkdir(parents=True, exist_ok=True)
        config_path.write_text(config)
        env = globus.service_env()
        env.update(
            {
                "GLOBUS_COLLECTION_ID": collection,
                "HUB_TRANSFER_CRYPT_KEY": CRYPT_KEY,
                "HUB_TRANSFER_DB_URL": f"sqlite:///{self.ledger_path}",
                "HUB_TRANSFER_CONFIG_FILE": str(config_path),
            }
        )
        self.hub = LocalHub(
            scratch,
            # the same switch as the end-to-end tests: HUB_PYTHON picks the
            # interpreter, hence the JupyterHub version, of hub and service
            python=os.environ.get("HUB_PYTHON") or sys.executable,
            users=self.users,
            service_env=env,
            # a killed service is back within a second or two, not 30 s
            service_poll_interval=1,
        )
        self._server_tokens: dict[str, str] = {}

    def start(self) -> StressHub:
        self.hub.start()
        self.book.file(f"hub log {self.hub.scratch.name}", self.hub.log_path)
        self.book.file(f"ledger {self.hub.scratch.name}", self.ledger_path)
        self.book.secret("hub admin token", self.hub.admin_token)
        cookie_secret = self.hub.scratch / "jupyterhub_cookie_secret"
        if cookie_secret.exists():
            self.book.secret("hub cookie secret", cookie_secret.read_text().strip())
        return self

    def stop(self) -> dict[str, t.Any]:
        return self.hub.stop()

    def server_token(self, user: str) -> str:
        if user not in self._server_tokens:
            token = self.hub.server_token(user)
            self.book.secret(f"hub server token of {user}", token)
            self._server_tokens[user] = token
        return self._server_tokens[user]

    def mint_token(self, user: str, scopes: list[str], expires_in: int = 3600) -> str:
        token = self.hub.mint_token(user, scopes, expires_in=expires_in)
        self.book.secret(f"hub token of {user} {scopes}", token)
        return token

    def ledger(self) -> dict[str, int]:
        """What the service's database tracks (read-only, never locks it):
        rules granted at Globus, unanswered rule requests still watched,
        submissions by state, kept refresh tokens."""
        uri = f"file:{self.ledger_path}?mode=ro"
        with sqlite3.connect(uri, uri=True, timeout=10) as db:
            # a row without a Globus id is a request Globus never answered,
            # which the service keeps looking for (orphan_watch): no grant
            rules, intents = db.execute(
                "SELECT count(globus_rule_id), count(*) - count(globus_rule_id) "
                "FROM rules"
            ).fetchone()
            kept = db.execute("SELECT count(*) FROM credentials").fetchone()[0]
            states = dict(
                db.execute("SELECT state, count(*) FROM submissions GROUP BY state")
            )
        return {
            "rules": int(rules),
            "watched": int(intents),
            "pending": int(states.get("pending", 0)),
            "active": int(states.get("active", 0)),
            "ended": int(states.get("ended", 0)),
            "credentials": int(kept),
        }

    def rules(self) -> list[dict[str, t.Any]]:
        return self.globus.rules(self.collection)

    def settle(self, prefix: str, timeout: float = 60.0) -> float:
        """End the run's tasks and wait until no rule is left anywhere."""
        seconds = self.try_settle(prefix, timeout)
        if seconds is None:
            pytest.fail(
                f"rules left {timeout:g} s after the tasks ended: Globus "
                f"{len(self.rules())}, ledger {self.ledger()}"
            )
        return seconds

    def try_settle(self, prefix: str, timeout: float = 60.0) -> float | None:
        """Like :meth:`settle`, but None instead of failing, so a part can
        report its figures before it asserts."""
        self.globus.rotate_tokens()
        self.globus.standin.clear_faults()
        self.globus.standin.set_latency(0)
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            self.globus.end_tasks(prefix)
            ledger = self.ledger()
            if not self.rules() and ledger["rules"] == 0 and not ledger["active"]:
                return time.monotonic() - start
            time.sleep(0.2)
        return None


def start_hub(
    scratch: pathlib.Path,
    globus: StressGlobus,
    book: Book,
    *,
    users: t.Sequence[str],
    collection: str,
    config: str,
) -> StressHub:
    if proxy_on_path(os.environ.get("PATH")) is None:
        pytest.fail(
            "configurable-http-proxy is not on PATH: export "
            "PATH=$PWD/.tools/node_modules/.bin:$PATH (scripts/setup.sh installs it)"
        )
    hub = StressHub(
        scratch, globus, book, users=users, collection=collection, config=config
    )
    try:
        hub.start()
    except LocalHubError as exc:
        pytest.fail(str(exc))
    return hub


@pytest.fixture(scope="session")
def stress_hub(
    sizes: Sizes,
    stress_globus: StressGlobus,
    book: Book,
    tmp_path_factory: pytest.TempPathFactory,
) -> t.Iterator[StressHub]:
    """The session's hub: ACL mode on STRESS_COLLECTION, limits out of the way."""
    hub = start_hub(
        tmp_path_factory.mktemp("stress-hub"),
        stress_globus,
        book,
        users=sizes.user_names(),
        collection=STRESS_COLLECTION,
        config=STRESS_CONFIG,
    )
    try:
        for user in hub.users:
            hub.server_token(user)
        yield hub
    finally:
        outcome = hub.stop()
        if outcome["leftovers"]:
            print("killed what the stress hub left running:", json.dumps(outcome))


# ----------------------------------------------------------------------
# clients


@dataclasses.dataclass
class Outcome:
    """One request as its client saw it."""

    label: str
    user: str
    started: float
    ended: float = 0.0
    status: int | None = None
    answer: dict[str, t.Any] | None = None
    # case-insensitive, as HTTP headers are (the proxy lowercases them)
    headers: t.Mapping[str, str] = dataclasses.field(
        default_factory=requests.structures.CaseInsensitiveDict
    )
    failure: str = ""

    @property
    def kind(self) -> str:
        """created, error (the service's JSON), page (not the service's
        JSON: the proxy's or hub's error page), no_answer (no HTTP answer)."""
        if self.status is None:
            return "no_answer"
        if self.answer is None:
            return "page"
        if self.status == 201 and self.answer.get("task_id"):
            return "created"
        if self.status >= 400 and isinstance(self.answer.get("error"), str):
            return "error"
        return "page"

    @property
    def code(self) -> str:
        if self.kind == "created":
            return "201"
        if self.kind == "error":
            assert self.answer is not None
            return f"{self.status} {self.answer['error']}"
        return f"{self.status} {self.kind}"

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def call(
    book: Book,
    method: str,
    url: str,
    *,
    label: str = "",
    user: str = "",
    token: str | None = None,
    timeout: float = 60.0,
    **kwargs: t.Any,
) -> Outcome:
    """One HTTP call, its answer classified and its body kept for the secrets
    check; never raises for a failed request."""
    headers = dict(kwargs.pop("headers", None) or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    outcome = Outcome(label=label, user=user, started=time.monotonic())
    try:
        response = http(method, url, headers=headers, timeout=timeout, **kwargs)
    except requests.RequestException as exc:
        outcome.failure = type(exc).__name__
        outcome.ended = time.monotonic()
        return outcome
    outcome.ended = time.monotonic()
    outcome.status = response.status_code
    outcome.headers = response.headers
    book.body(response.text)
    if response.headers.get("Content-Type", "").startswith("application/json"):
        try:
            answer = response.json()
        except ValueError:
            answer = None
        outcome.answer = answer if isinstance(answer, dict) else None
    return outcome


def transfer_document(
    token: str, user: str, label: str, index: int, collection: str
) -> dict[str, t.Any]:
    """A transfer of one of three kinds, by ``index``: into the user's area of
    the collection (rw rule), out of it (r rule, the same directories, so
    rules are reused and widened), or between two other collections (none).
    Forty directories keep rule creation busy while staying under the
    per-user quota (50) whatever the number of users."""
    folder = f"/{user}/inbox/{index % 40}/"
    kind = index % 3
    if kind == 0:
        source, destination = ELSEWHERE_SOURCE, collection
        item = {"source_path": f"/data/{label}", "destination_path": folder + label}
    elif kind == 1:
        source, destination = collection, ELSEWHERE_DESTINATION
        item = {"source_path": folder, "destination_path": "/out/", "recursive": True}
    else:
        source, destination = ELSEWHERE_SOURCE, ELSEWHERE_DESTINATION
        item = {"source_path": f"/data/{label}", "destination_path": "/copy/"}
    return {
        "globus_token": token,
        "transfer": {
            "source_endpoint": source,
            "destination_endpoint": destination,
            "DATA": [item],
            "label": label,
        },
    }


def submit(
    hub: StressHub, user: str, label: str, index: int, timeout: float = 60.0
) -> Outcome:
    document = transfer_document(
        hub.globus.token(user), user, label, index, hub.collection
    )
    return call(
        hub.book,
        "POST",
        hub.hub.service_url,
        label=label,
        user=user,
        token=hub.server_token(user),
        json=document,
        timeout=timeout,
    )


def run_many(
    work: t.Callable[[int], Outcome], count: int, clients: int
) -> list[Outcome]:
    """``work(i)`` for i in range(count), ``clients`` at a time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(work, range(count)))


class Load:
    """Clients submitting in a loop until stopped (bounded in count and time).

    Each client pauses briefly after an answer that is not the service's, so
    a service that is down is not hammered with thousands of requests.
    """

    def __init__(
        self,
        hub: StressHub,
        prefix: str,
        clients: int,
        *,
        max_requests: int = 5000,
        max_seconds: float = 300.0,
    ) -> None:
        self.hub = hub
        self.prefix = prefix
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._count = 0
        self.max_requests = max_requests
        self.deadline = time.monotonic() + max_seconds
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True)
            for n in range(clients)
        ]

    def _next(self) -> int | None:
        with self._lock:
            if self._count >= self.max_requests:
                return None
            self._count += 1
            return self._count - 1

    def _client(self, number: int) -> None:
        users = self.hub.users
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            index = self._next()
            if index is None:
                return
            user = users[(number + index) % len(users)]
            outcome = submit(self.hub, user, f"{self.prefix}-{index}", index)
            with self._lock:
                self.outcomes.append(outcome)
            if outcome.kind in ("page", "no_answer"):
                time.sleep(0.2)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 90.0) -> list[Outcome]:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        alive = [thread for thread in self._threads if thread.is_alive()]
        assert not alive, f"{len(alive)} client(s) still waiting for an answer"
        return sorted(self.outcomes, key=lambda outcome: outcome.started)

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def check_tasks(
    globus: StressGlobus, outcomes: t.Iterable[Outcome]
) -> dict[str, list[str]]:
    """Match the stand-in's tasks to the answers by label (one label each).

    :returns: problems by kind; every list empty means every 201 has exactly
        its task and nothing was submitted twice
    """
    tasks = globus.tasks_by_label()
    problems: dict[str, list[str]] = {
        "201 without its task": [],
        "label with several tasks": [],
        "task of a failed request": [],
    }
    for outcome in outcomes:
        found = tasks.get(outcome.label, [])
        if len(found) > 1:
            problems["label with several tasks"].append(outcome.label)
        if outcome.kind == "created":
            assert outcome.answer is not None
            if [task["task_id"] for task in found] != [outcome.answer["task_id"]]:
                problems["201 without its task"].append(outcome.label)
        elif outcome.kind == "error" and found:
            problems["task of a failed request"].append(
                f"{outcome.label} ({outcome.code})"
            )
    return problems
