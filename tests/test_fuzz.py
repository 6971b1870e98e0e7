"""Property-based fuzz of the submit endpoint, in-process.

Thousands of generated bodies (valid, nearly valid and hostile) are posted to
the real Tornado application with the fake hub and the fake submitter, with
ACL mode off and on. Whatever arrives, the service must answer: JSON with a
stable ``error`` code for every failure, never a 5xx, and a ``task_id`` for
every 201. In ACL mode, a 201 must never come with a rule outside the caller's
area: that is where a path trick would turn into a data leak.

Why in-process: a fuzz is only useful with many cases, and the real HTTP path
through the proxy costs a hundred times more per case; the hub and Globus are
covered by the end-to-end and stress suites.
"""

from __future__ import annotations

import collections
import json
import logging
import string
import time
import typing as t
import uuid

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from hub_transfer.access import AccessManager
from hub_transfer.app import HubTransferApp
from hub_transfer.limits import UserLimits
from hub_transfer.policy import AccessPolicy
from hub_transfer.store import Store
from hub_transfer.store.models import Submission

from .conftest import DESTINATION, PREFIX, SOURCE

COLLECTION = "c0ffee00-0000-4000-8000-00000000f022"
MAX_ITEMS = 1000
MAX_BODY = 1024 * 1024
ERROR_FIELDS = {"status", "error", "message"}

# every answer seen by this module: printed once at the end of the session
FIGURES: dict[str, t.Any] = {
    "documents": 0,
    "statuses": collections.Counter(),
    "errors": collections.Counter(),
    "seconds": 0.0,
}

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    # no shrinking: documents are small already, and a failure must not turn
    # the normal run into minutes of minimising
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


class FiguresReport:
    """A plugin registered at run time, so the figures reach the terminal
    whether or not output is captured (``-s`` or not)."""

    def pytest_terminal_summary(self, terminalreporter: t.Any) -> None:
        if not FIGURES["documents"]:
            return
        statuses = ", ".join(
            f"{code}: {count}" for code, count in sorted(FIGURES["statuses"].items())
        )
        terminalreporter.write_line(
            f"[fuzz] {FIGURES['documents']} documents in "
            f"{FIGURES['seconds']:.1f}s; statuses {statuses}; "
            f"{len(FIGURES['errors'])} distinct error codes"
        )


@pytest.fixture(scope="module", autouse=True)
def figures_report(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("hub-transfer-fuzz-figures"):
        manager.register(FiguresReport(), "hub-transfer-fuzz-figures")


class FakeCollectionACL:
    """The Globus side of ACL mode, recorded instead of sent.

    Everything else of ACL mode is real: the policy deciding which directories
    a transfer needs (or refusing it) and the ledger recording every rule and
    submission in SQLite before Globus would be asked.
    """

    def __init__(self) -> None:
        self.added: list[tuple[str, str, str]] = []

    async def add_rule(self, identity_id, path, permissions, expires):
        self.added.append((identity_id, path, permissions))
        return f"rule-{len(self.added)}", True, None

    async def update_rule(self, rule_id, permissions, expires):
        return None

    async def delete_rule(self, rule_id):
        return None

    async def find_rule(self, identity_id, path):
        return None

    async def list_rules(self):
        return []


@pytest.fixture
def mode(request: pytest.FixtureRequest) -> str:
    """ACL mode off ("plain") unless a test asks for both; only documents
    that pass the body checks reach the ACL policy, so hostile bytes and
    strangers need no second run."""
    return str(getattr(request, "param", "plain"))


BOTH_MODES = pytest.mark.parametrize("mode", ["plain", "acl"], indirect=True)


@pytest.fixture
def hub_app(fake_hub_auth, submitter, mode, tmp_path) -> t.Iterator[HubTransferApp]:
    """The service with limits out of the way: thousands of posts from one
    user must be judged on their bodies, not on the rate limit."""
    extra: dict[str, t.Any] = {}
    store = None
    if mode == "acl":
        store = Store(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
        store.upgrade()
        access = AccessManager(
            collection_id=COLLECTION, max_rules=10**6, store=store, submitter=submitter
        )
        access._acl = FakeCollectionACL()  # type: ignore[assignment]
        extra.update(access=access, policy=AccessPolicy(), store=store)
    app = HubTransferApp(
        hub_auth=fake_hub_auth,
        submitter=submitter,
        service_prefix=PREFIX,
        limits=UserLimits(max_concurrent=10**6, per_minute=10**9),
        **extra,
    )
    app.init_submitter()
    app.init_tornado()
    yield app
    if store is not None:
        store.close()


class Poster:
    """Posts raw bytes with the real HTTP client and checks every answer."""

    def __init__(self, io_loop: t.Any, client: t.Any, hub_app: HubTransferApp):
        self.io_loop = io_loop
        self.client = client
        self.access = hub_app.access

    def post(
        self,
        body: bytes,
        *,
        content_type: str | None = "application/json",
        token: str = "alice-server-token",
        path: str = "",
    ) -> tuple[int, dict[str, t.Any]]:
        headers = {"Authorization": f"Bearer {token}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        started = time.perf_counter()
        response = self.io_loop.run_sync(
            lambda: self.client.fetch(
                PREFIX + path,
                method="POST",
                headers=headers,
                body=body,
                raise_error=False,
                request_timeout=30,
            )
        )
        FIGURES["seconds"] += time.perf_counter() - started
        return self.check(response)

    def check(self, response: t.Any) -> tuple[int, dict[str, t.Any]]:
        """The contract every answer keeps, whatever was sent."""
        status = response.code
        FIGURES["documents"] += 1
        FIGURES["statuses"][status] += 1
        assert status != 599, f"no HTTP answer: {response.error!r}"
        assert status < 500, f"server error {status}: {response.body[:500]!r}"
        assert response.headers.get("Content-Type", "").startswith(
            "application/json"
        ), response.headers
        answer = json.loads(response.body)
        assert isinstance(answer, dict), answer
        if status == 201:
            assert isinstance(answer.get("task_id"), str) and answer["task_id"]
        else:
            assert 400 <= status < 500, status
            assert ERROR_FIELDS <= set(answer), answer
            assert answer["status"] == status, answer
            assert isinstance(answer["error"], str) and answer["error"]
            assert isinstance(answer["message"], str) and answer["message"]
            FIGURES["errors"][answer["error"]] += 1
        return status, answer

    @property
    def acl(self) -> FakeCollectionACL | None:
        return None if self.access is None else self.access._acl  # type: ignore

    def granted_since(self, count: int) -> list[tuple[str, str, str]]:
        return [] if self.acl is None else self.acl.added[count:]

    def granted_count(self) -> int:
        return 0 if self.acl is None else len(self.acl.added)

    def rules_of(self, task_id: str) -> list[str]:
        """The directories the ledger says this task holds rules on."""
        assert self.access is not None
        with self.access.ledger.session() as db:
            submission = db.scalars(
                select(Submission).where(Submission.task_id == task_id)
            ).one()
            return [rule.path for rule in submission.rules]


@pytest.fixture
def poster(io_loop, http_server_client, hub_app) -> t.Iterator[Poster]:
    """The poster, with the one-line-per-failure log muted: thousands of
    expected 4xx lines would cost more than the requests themselves. Server
    errors are logged at ERROR and still show."""
    quiet = [logging.getLogger(name) for name in ("tornado.access", "hub_transfer")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    yield Poster(io_loop, http_server_client, hub_app)
    for logger, level in zip(quiet, levels, strict=True):
        logger.setLevel(level)


# ----------------------------------------------------------------------
# strategies

# plain path segments: a fixed vocabulary is far cheaper to draw than text,
# and hostile text comes from NASTY_TEXT and the mutations anyway
SEGMENT = st.sampled_from(
    [
        "a",
        "data",
        "file1.txt",
        "...",
        "a b",
        "ünï",
        "日本",
        "%2e%2e",
        "-x",
        "_",
        "x" * 200,
    ]
)
NASTY_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "..",
            "/../../etc/passwd",
            "/alice/../bob/",
            "/alice/./x",
            "/alice//x",
            "~",
            "~/",
            "~bob/x",
            "/alice/\x00x",
            "/alice/x\ny",
            "/alice/\u202ex",
            "/ALICE/x",
            "/alice",
            "/alice/",
            "/",
            "",
            " ",
            "/alice/" + "a" * 5000,
            "\\alice\\x",
            "/alice/%2e%2e/bob",
            "/alice/\udcff",
        ]
    ),
)
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    NASTY_TEXT,
)
ANY_JSON = st.recursive(
    JSON_LEAF,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=10,
)


UUIDS = st.uuids().map(str)
LABEL = st.one_of(
    st.none(),
    st.just("absent"),
    st.text(
        alphabet=st.characters(blacklist_categories=["Cc", "Cs"]),
        max_size=120,
    ),
)
RECURSIVE = st.sampled_from([True, False, None, "absent"])
DESTINATION_KEY = st.sampled_from(["destination_path", "destination"])


def plain_path(root: str) -> st.SearchStrategy[str]:
    def join(segments: list[str], trailing: bool) -> str:
        path = root + "/".join(segments)
        return path + "/" if trailing and segments else path

    return st.builds(join, st.lists(SEGMENT, max_size=4), st.booleans())


PATHS = {root: plain_path(root) for root in ("/", "/alice/")}


@st.composite
def valid_item(draw: st.DrawFn, root: str = "/") -> dict[str, t.Any]:
    item: dict[str, t.Any] = {
        "source_path": draw(PATHS[root]),
        draw(DESTINATION_KEY): draw(PATHS[root]),
    }
    recursive = draw(RECURSIVE)
    if recursive != "absent":
        item["recursive"] = recursive
    return item


ITEMS = {root: st.lists(valid_item(root), min_size=1, max_size=6) for root in PATHS}


@st.composite
def valid_document(
    draw: st.DrawFn, endpoints: tuple[str, str] = (SOURCE, DESTINATION)
) -> dict[str, t.Any]:
    source, destination = endpoints
    root = "/alice/" if COLLECTION in endpoints else "/"
    transfer: dict[str, t.Any] = {
        "source_endpoint": draw(st.sampled_from([source, source.upper()])),
        "destination_endpoint": destination,
        "DATA": draw(ITEMS[root]),
    }
    label = draw(LABEL)
    if label != "absent":
        transfer["label"] = label
    return {"globus_token": "good-globus-token", "transfer": transfer}


# A mutation is data, (where, key, value), applied in plain Python: building
# strategies per example would cost more than posting the document.
TRANSFER_KEYS = ["source_endpoint", "destination_endpoint", "DATA", "label"]
ITEM_KEYS = ["source_path", "destination_path", "destination", "recursive"]
WEIRD_UUID = st.one_of(
    UUIDS.map(lambda u: "{" + u + "}"),
    UUIDS.map(lambda u: u.replace("-", "")),
    UUIDS.map(lambda u: "urn:uuid:" + u),
    UUIDS.map(lambda u: " " + u),
    UUIDS.map(lambda u: u + "\n"),
    ANY_JSON,
)
DROPPED = object()
MUTATION = st.one_of(
    st.tuples(st.just("transfer"), st.sampled_from(TRANSFER_KEYS[:2]), WEIRD_UUID),
    st.tuples(st.just("transfer"), st.sampled_from(TRANSFER_KEYS), ANY_JSON),
    st.tuples(st.just("transfer"), st.sampled_from(TRANSFER_KEYS), st.just(DROPPED)),
    st.tuples(st.just("item"), st.sampled_from(ITEM_KEYS), ANY_JSON),
    st.tuples(st.just("item"), st.sampled_from(ITEM_KEYS), NASTY_TEXT),
    st.tuples(
        st.just("transfer"),
        st.just("label"),
        st.one_of(
            st.text(min_size=129, max_size=300),
            st.sampled_from(["a\nb", "\x00", "\t", "  ", "x" * 128]),
        ),
    ),
    st.tuples(
        st.just("top"),
        st.sampled_from(["globus_token", "transfer", "extra", "DATA"]),
        ANY_JSON,
    ),
    st.tuples(
        st.just("top"),
        st.just("globus_token"),
        st.sampled_from(["", "expired-token", "bad-token", "good\x00x"]),
    ),
)


def mutate(document: dict[str, t.Any], mutation: tuple[str, str, t.Any]) -> None:
    """Apply one change in place; it may or may not break the document.

    A transfer or item an earlier change broke is replaced by an empty one,
    so chained changes always apply.
    """
    where, key, value = mutation
    target: dict[str, t.Any] = document
    if where in ("transfer", "item"):
        if not isinstance(document.get("transfer"), dict):
            document["transfer"] = {}
        target = document["transfer"]
    if where == "item":
        items = target.get("DATA")
        if not isinstance(items, list) or not items or not isinstance(items[0], dict):
            items = target["DATA"] = [{}]
        target = items[0]
    if value is DROPPED:
        target.pop(key, None)
    else:
        target[key] = value


@st.composite
def near_valid_document(draw: st.DrawFn, endpoints: tuple[str, str]) -> bytes:
    document = draw(valid_document(endpoints))
    for mutation in draw(st.lists(MUTATION, min_size=1, max_size=2)):
        mutate(document, mutation)
    return json.dumps(document).encode()


def endpoints_for(mode: str) -> st.SearchStrategy[tuple[str, str]]:
    if mode == "plain":
        return st.just((SOURCE, DESTINATION))
    return st.sampled_from(
        [(SOURCE, COLLECTION), (COLLECTION, DESTINATION), (COLLECTION, COLLECTION)]
    )


CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "APPLICATION/JSON; charset=utf-8",
        "application/json;charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "",
        "application/json, text/plain",
    ]
)
RAW_BYTES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b'"transfer"',
            b"\xff\xfe{\x00}\x00",
            b'{"transfer": {"DATA": [' + b"[" * 5000 + b"]" * 5000 + b"]}}",
            b"[" * 100_000,
            b"{" * 50_000,
            b'{"globus_token": "good", "transfer": NaN}',
            b'{"a": 1e999999}',
            b'{"transfer": {}, "transfer": 5}',
            b"\xef\xbb\xbf{}",
        ]
    ),
)


# ----------------------------------------------------------------------
# properties


def assert_inside_area(path: str) -> None:
    """A plain directory inside alice's area: nothing a path trick could widen."""
    assert path.startswith("/alice/"), path
    assert path.endswith("/"), path
    assert "//" not in path, path
    assert not {".", "..", ""} & set(path.strip("/").split("/")), path
    assert not any(segment.startswith("~") for segment in path.split("/")), path


def assert_granted_inside_area(poster: Poster, before: int) -> None:
    """Every rule asked of Globus since ``before`` stays in alice's area."""
    for _identity, path, permissions in poster.granted_since(before):
        assert_inside_area(path)
        assert permissions in ("r", "rw"), permissions


@BOTH_MODES
@settings(FUZZ, max_examples=130)
@given(data=st.data())
def test_valid_documents_are_accepted(poster: Poster, mode: str, data) -> None:
    """The extension's own documents, in every shape it may send, get 201."""
    endpoints = data.draw(endpoints_for(mode))
    document = data.draw(valid_document(endpoints))
    before = poster.granted_count()
    path = data.draw(st.sampled_from(["", "api/transfers"]))
    status, answer = poster.post(json.dumps(document).encode(), path=path)
    assert status == 201, answer
    assert_granted_inside_area(poster, before)
    if mode == "acl":
        held = poster.rules_of(answer["task_id"])
        assert held, "a transfer on the hub collection holds no rule"
        for path in held:
            assert_inside_area(path)


@BOTH_MODES
@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_nearly_valid_documents_get_json_answers(
    poster: Poster, mode: str, data
) -> None:
    """One or two changes to a valid document: accepted, or refused with a
    document, path or token code (never anything about the service)."""
    endpoints = data.draw(endpoints_for(mode))
    bodies = data.draw(st.lists(near_valid_document(endpoints), min_size=1, max_size=3))
    for body in bodies:
        before = poster.granted_count()
        status, answer = poster.post(body)
        if status != 201:
            assert answer["error"] in (
                "invalid_transfer",
                "invalid_path",
                "path_not_allowed",
                "globus_token_missing",
                "globus_token_inactive",
                "globus_token_expired",
            ), answer
        if answer.get("error") == "invalid_transfer":
            assert isinstance(answer.get("field"), str), answer
        assert_granted_inside_area(poster, before)


@settings(FUZZ, max_examples=220)
@given(document=ANY_JSON, wrap=st.booleans())
def test_arbitrary_json_gets_json_answers(
    poster: Poster, document: t.Any, wrap: bool
) -> None:
    if wrap:
        document = {"globus_token": "good-globus-token", "transfer": document}
    body = json.dumps(document).encode()
    status, answer = poster.post(body)
    assert status in (201, 400, 401, 403), answer


@settings(FUZZ, max_examples=400)
@given(body=RAW_BYTES, content_type=CONTENT_TYPES)
def test_raw_bytes_and_content_types_get_json_answers(
    poster: Poster, body: bytes, content_type: str | None
) -> None:
    status, answer = poster.post(body, content_type=content_type)
    assert status in (400, 401, 403, 415), answer
    sent = "application/json" if content_type is None else content_type
    declared = sent.split(";")[0].strip().lower()
    if declared != "application/json":
        assert (status, answer["error"]) == (415, "unsupported_media_type")


@settings(FUZZ, max_examples=120)
@given(
    body=st.one_of(RAW_BYTES, ANY_JSON.map(lambda d: json.dumps(d).encode())),
    token=st.one_of(
        st.sampled_from(["", "bob-no-access", "alice-server-token "]),
        st.text(alphabet=string.printable.strip(), min_size=1, max_size=60),
    ),
)
def test_strangers_are_refused_before_the_body(
    poster: Poster, body: bytes, token: str
) -> None:
    """Without a hub token that grants access, the body is never judged."""
    status, answer = poster.post(body, token=token.strip() or "x")
    if token.strip() == "alice-server-token":
        return
    expected = "hub_access_denied" if token == "bob-no-access" else "hub_auth_required"
    assert answer["error"] == expected, answer


@BOTH_MODES
def test_extremes(poster: Poster, mode: str) -> None:
    """Sizes generators rarely reach: the item cap, huge bodies, long paths."""
    root = "/alice/" if mode == "acl" else "/"
    destination = COLLECTION if mode == "acl" else DESTINATION

    def document(items: int, path: str = root + "f") -> dict[str, t.Any]:
        return {
            "globus_token": "good-globus-token",
            "transfer": {
                "source_endpoint": SOURCE,
                "destination_endpoint": destination,
                "DATA": [
                    {"source_path": f"/s/{i}", "destination_path": f"{path}{i}"}
                    for i in range(items)
                ],
            },
        }

    cases: list[tuple[bytes, int, str | None]] = [
        (json.dumps(document(MAX_ITEMS)).encode(), 201, None),
        (json.dumps(document(MAX_ITEMS + 1)).encode(), 400, "invalid_transfer"),
        (json.dumps(document(1, root + "p" * 4096)).encode(), 400, None),
        (b" " * (MAX_BODY + 1), 413, "body_too_large"),
        (json.dumps(document(20000)).encode()[: MAX_BODY + 10], 413, None),
        (b'{"transfer": ' + b"[" * 900_000 + b"]" * 100_000, 400, None),
        (json.dumps({"x": "y" * (MAX_BODY - 20)}).encode(), 400, "invalid_transfer"),
    ]
    for body, expected, error in cases:
        status, answer = poster.post(body)
        assert status == expected, (len(body), answer)
        if error:
            assert answer["error"] == error


@BOTH_MODES
@pytest.mark.parametrize("where", ["source_path", "destination_path", "label"])
def test_lone_surrogates_are_no_server_error(
    poster: Poster, mode: str, where: str
) -> None:
    """JSON may escape a lone surrogate (``"\\udcff"``); Python decodes it to a
    str that no UTF-8 encoder accepts, so it must be refused as a bad document
    (or passed on), never crash the service. A real file name cannot hold one.
    """
    on_collection = mode == "acl"
    transfer: dict[str, t.Any] = {
        "source_endpoint": COLLECTION if on_collection else SOURCE,
        "destination_endpoint": COLLECTION if on_collection else DESTINATION,
        "DATA": [{"source_path": "/alice/a/f", "destination_path": "/alice/b/f"}],
        "label": "fine",
    }
    bad = "/alice/x\udcff/f" if where != "label" else "label \udcff"
    if where == "label":
        transfer["label"] = bad
    else:
        transfer["DATA"][0][where] = bad
    body = json.dumps({"globus_token": "good-globus-token", "transfer": transfer})
    assert "\\udcff" in body
    status, answer = poster.post(body.encode())
    assert status in (201, 400), answer


def test_a_fresh_uuid_never_collides_with_the_collection() -> None:
    """Guard for the generators above: plain mode must never hit ACL paths."""
    assert uuid.UUID(COLLECTION) not in (uuid.UUID(SOURCE), uuid.UUID(DESTINATION))
