"""Hostile and careless callers, through the hub's proxy, against README.

A hub of its own with the service's default limits and timeouts (the stress
hub lifts the limits), in ACL mode on its own collection. Each case states the
status and error code the README promises; every answer must be the service's
JSON, and no refused request may leave a task or a rule behind.
"""

from __future__ import annotations

import re
import threading
import time
import typing as t
import urllib.parse
import uuid

import pytest
import requests

from hub_transfer.testing.standin_state import TRANSFER_SCOPE

from .conftest import (
    ELSEWHERE_DESTINATION,
    ELSEWHERE_SOURCE,
    HOSTILE_COLLECTION,
    Book,
    Outcome,
    StressGlobus,
    StressHub,
    call,
    histogram,
    report,
    run_many,
    start_hub,
)

USERS = ("alice", "bob", "carol", "dave", "erin")
ACCESS_SCOPE = "access:services!service=hub-transfer"
HOSTILE_CONFIG = """\
c.AccessManager.poll_interval = 0.5
c.AccessManager.max_poll_interval = 1
"""
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def cases() -> t.Iterator[list[tuple[str, str, str]]]:
    """(case, expected, got) rows, reported as one table at the end."""
    rows: list[tuple[str, str, str]] = []
    yield rows
    if rows:
        width = max(len(case) for case, _, _ in rows)
        report(
            "hostile callers (case: expected -> got)",
            [(case.ljust(width), f"{want} -> {got}") for case, want, got in rows],
        )


@pytest.fixture(scope="module")
def hostile_hub(
    stress_globus: StressGlobus, book: Book, tmp_path_factory: pytest.TempPathFactory
) -> t.Iterator[StressHub]:
    hub = start_hub(
        tmp_path_factory.mktemp("hostile-hub"),
        stress_globus,
        book,
        users=USERS,
        collection=HOSTILE_COLLECTION,
        config=HOSTILE_CONFIG,
    )
    try:
        yield hub
        hub.settle("", timeout=30)
    finally:
        hub.stop()


class Caller:
    """Posts documents to the hostile hub and checks answers against README."""

    def __init__(
        self, hub: StressHub, book: Book, rows: list[tuple[str, str, str]]
    ) -> None:
        self.hub = hub
        self.book = book
        self.rows = rows
        self.count = 0

    def document(
        self,
        user: str,
        *,
        token: str | None = None,
        path: str | None = None,
        items: list[dict[str, t.Any]] | None = None,
        into_collection: bool = True,
    ) -> dict[str, t.Any]:
        self.count += 1
        label = f"hostile-{self.count}"
        destination = HOSTILE_COLLECTION if into_collection else ELSEWHERE_DESTINATION
        if items is None:
            items = [
                {
                    "source_path": "/data/f",
                    "destination_path": path or f"/{user}/in/{label}",
                }
            ]
        return {
            "globus_token": self.hub.globus.token(user) if token is None else token,
            "transfer": {
                "source_endpoint": ELSEWHERE_SOURCE,
                "destination_endpoint": destination,
                "DATA": items,
                "label": label,
            },
        }

    def post(
        self,
        hub_token: str | None,
        document: t.Any = None,
        *,
        label: str = "",
        path: str = "",
        **kwargs: t.Any,
    ) -> Outcome:
        if document is not None:
            kwargs["json"] = document
            label = label or document["transfer"]["label"]
        return call(
            self.book,
            kwargs.pop("method", "POST"),
            self.hub.hub.service_url + path,
            label=label,
            token=hub_token,
            timeout=120,
            **kwargs,
        )

    def expect(self, case: str, outcome: Outcome, status: int, *errors: str) -> Outcome:
        """The answer is the service's JSON with this status and one of these
        codes, and a refused request left no task behind."""
        want = f"{status} {'|'.join(errors)}" if errors else str(status)
        self.rows.append((case, want, outcome.code))
        if status == 201:
            assert outcome.kind == "created", (case, outcome)
            return outcome
        assert outcome.kind == "error", (case, outcome.code, outcome.failure)
        assert outcome.status == status, (case, outcome.answer)
        assert outcome.answer is not None
        if errors:
            assert outcome.answer["error"] in errors, (case, outcome.answer)
        assert outcome.answer["status"] == status
        if outcome.label:
            tasks = self.hub.globus.tasks_by_label().get(outcome.label, [])
            assert not tasks, f"{case}: refused, yet Globus has its task"
        return outcome


@pytest.fixture(scope="module")
def caller(
    hostile_hub: StressHub, book: Book, cases: list[tuple[str, str, str]]
) -> Caller:
    return Caller(hostile_hub, book, cases)


# ----------------------------------------------------------------------
# hub identity


def test_hub_tokens(caller: Caller) -> None:
    hub = caller.hub
    good = caller.document("alice")

    caller.expect("no hub token", caller.post(None, good), 401, "hub_auth_required")
    forged = "forged-" + uuid.uuid4().hex
    caller.expect(
        "forged hub token", caller.post(forged, good), 401, "hub_auth_required"
    )
    caller.expect(
        "token scheme, forged",
        caller.post(None, good, headers={"Authorization": f"token {forged}"}),
        401,
        "hub_auth_required",
    )

    expiring = hub.mint_token("alice", [ACCESS_SCOPE], expires_in=1)
    time.sleep(2.5)
    caller.expect(
        "expired hub token (never used)",
        caller.post(expiring, caller.document("alice")),
        401,
        "hub_auth_required",
    )

    narrow = hub.mint_token("alice", ["read:users:name!user=alice"])
    caller.expect(
        "hub token without the access scope",
        caller.post(narrow, caller.document("alice")),
        403,
        "hub_access_denied",
    )
    other = hub.mint_token("alice", ["access:servers!user=alice"])
    caller.expect(
        "hub token for alice's server only",
        caller.post(other, caller.document("alice")),
        403,
        "hub_access_denied",
    )
    caller.expect(
        "a hub service's own token",
        caller.post(hub.hub.admin_token, caller.document("alice")),
        403,
        "hub_access_denied",
        "users_only",
    )


def test_revoked_hub_token(caller: Caller) -> None:
    """The service caches the hub's answer about a token for 60 s (README), so
    a token revoked at the hub may keep working that long. Measured and
    reported, not asserted: waiting out the cache would cost a minute."""
    hub = caller.hub
    token = hub.mint_token("alice", [ACCESS_SCOPE])
    # a bad Globus token: the answer says whether the hub token passed, and
    # no transfer is made either way
    caller.expect(
        "hub token before revocation",
        caller.post(token, caller.document("alice", token="not-a-globus-token")),
        401,
        "globus_token_inactive",
    )
    listed = hub.hub.api("GET", "users/alice/tokens")
    assert listed.status_code == 200, listed.text
    for model in listed.json()["api_tokens"]:
        if model.get("note") == "localhub":
            hub.hub.api("DELETE", f"users/alice/tokens/{model['id']}")
    after = caller.post(token, caller.document("alice", token="not-a-globus-token"))
    assert after.kind == "error" and after.status == 401, after
    caller.rows.append(
        (
            "hub token right after revocation",
            "401 hub_auth_required (or accepted <= 60 s, cached)",
            after.code,
        )
    )


def test_other_users_areas(caller: Caller) -> None:
    hub = caller.hub
    alice, bob = hub.server_token("alice"), hub.server_token("bob")
    caller.expect(
        "bob's hub token, alice's Globus token, alice's area",
        caller.post(
            bob,
            caller.document(
                "alice", token=hub.globus.token("alice"), path="/alice/in/x"
            ),
        ),
        403,
        "path_not_allowed",
    )
    caller.expect(
        "bob's own tokens, a path in alice's area",
        caller.post(bob, caller.document("bob", path="/alice/in/x")),
        403,
        "path_not_allowed",
    )
    for case, path, error in (
        ("dot-dot out of the area", "/bob/../alice/x", "invalid_path"),
        ("tilde path on the collection", "~/x", "invalid_path"),
        ("relative path on the collection", "bob/x", "invalid_path"),
        ("empty segment", "/bob//x", "invalid_path"),
        ("bidi override in a path", "/bob/\u202ex", "invalid_transfer"),
        ("another user's area by prefix", "/bobby/x", "path_not_allowed"),
    ):
        status = 403 if error == "path_not_allowed" else 400
        caller.expect(
            case, caller.post(bob, caller.document("bob", path=path)), status, error
        )

    mine = caller.expect(
        "alice's own transfer", caller.post(alice, caller.document("alice")), 201
    )
    listing = caller.post(bob, None, path="api/transfers", method="GET")
    assert listing.status == 200 and listing.answer is not None, listing
    seen = {item.get("task_id") for item in listing.answer["items"]}
    assert mine.answer is not None and mine.answer["task_id"] not in seen
    caller.rows.append(("bob lists transfers", "none of alice's", "none of alice's"))
    caller.expect(
        "non-admin lists the rules",
        caller.post(alice, None, path="api/acls", method="GET"),
        403,
        "admin_only",
    )


def test_cookie_session_needs_xsrf(caller: Caller) -> None:
    """A browser session obtained through the hub's OAuth flow: a POST that
    carries the session cookie but no XSRF token must not be taken as the
    user's; with the token it is (so the session is real)."""
    hub = caller.hub
    base = hub.hub.url
    service_path = urllib.parse.urlparse(hub.hub.service_url).path
    with requests.Session() as browser:
        browser.trust_env = False
        form = browser.get(f"{base}/hub/login", timeout=10)
        found = re.search(r'name="_xsrf" value="([^"]+)"', form.text)
        assert found, "the hub's login form carries no _xsrf field"
        landed = browser.post(
            f"{base}/hub/login?next={urllib.parse.quote(service_path)}",
            data={"username": "carol", "password": "any", "_xsrf": found.group(1)},
            timeout=30,
        )
        assert landed.status_code == 200, landed.text[:300]
        assert landed.json()["user"] == "carol", landed.text[:300]
        xsrf = [
            c.value
            for c in browser.cookies
            if c.name == "_xsrf" and (c.path or "/").startswith(service_path)
        ]
        assert xsrf, [(c.name, c.path) for c in browser.cookies]

        def browser_post(headers: dict[str, str]) -> Outcome:
            document = caller.document("carol")
            outcome = Outcome(
                label=document["transfer"]["label"], user="carol", started=0.0
            )
            answer = browser.post(
                hub.hub.service_url, json=document, headers=headers, timeout=60
            )
            caller.book.body(answer.text)
            outcome.status = answer.status_code
            outcome.headers = answer.headers
            if answer.headers.get("Content-Type", "").startswith("application/json"):
                outcome.answer = answer.json()
            return outcome

        caller.expect(
            "cookie session, POST without XSRF",
            browser_post({"Origin": base}),
            401,
            "hub_auth_required",
        )
        caller.expect(
            "cookie session, POST with a wrong XSRF",
            browser_post({"X-XSRFToken": "x" + xsrf[0][1:]}),
            401,
            "hub_auth_required",
        )
        caller.expect(
            "cookie session, POST with its XSRF token",
            browser_post({"X-XSRFToken": xsrf[0]}),
            201,
        )


# ----------------------------------------------------------------------
# Globus tokens


def test_globus_tokens(caller: Caller) -> None:
    hub = caller.hub
    globus = hub.globus
    alice = hub.server_token("alice")
    other_client = globus.standin.create_client(name="someone else's app")
    revoked = globus.issue("alice")
    globus.standin.revoke_token(revoked)
    tokens = {
        "Globus token missing": ("", "globus_token_missing"),
        "Globus token inactive": (
            globus.issue("alice", active=False),
            "globus_token_inactive",
        ),
        "Globus token expired": (
            globus.issue("alice", expires_in=1),
            "globus_token_inactive|globus_token_expired",
        ),
        "Globus token revoked": (revoked, "globus_token_inactive"),
        "Globus token of another client": (
            globus.issue("alice", scope=other_client["scope"]),
            "globus_token_inactive",
        ),
        "Globus token for another scope": (
            globus.issue("alice", scope=TRANSFER_SCOPE, issued_to=globus.client_id),
            "globus_token_scope",
        ),
        "not a Globus token": ("x" * 40, "globus_token_inactive"),
    }
    time.sleep(1.5)  # the expiring token has expired
    for case, (token, errors) in tokens.items():
        document = caller.document("alice", token=token)
        if not token:
            del document["globus_token"]
        caller.expect(case, caller.post(alice, document), 401, *errors.split("|"))


def test_globus_token_with_a_lone_surrogate(caller: Caller) -> None:
    """JSON may carry ``"\\udcff"``, which decodes to a str no UTF-8 encoder
    takes; as a Globus token it must be refused as malformed (400), not reach
    the HTTP library and fail the request with a 500."""
    document = caller.document("alice", token="abc\udcffdef")
    caller.expect(
        "Globus token with a lone surrogate",
        caller.post(caller.hub.server_token("alice"), document),
        400,
        "invalid_transfer",
    )


# ----------------------------------------------------------------------
# bodies


def test_bodies(caller: Caller) -> None:
    hub = caller.hub
    alice = hub.server_token("alice")
    headers = {"Content-Type": "application/json"}
    big = b'{"x": "' + b"a" * (MIB + MIB // 2) + b'"}'
    caller.expect(
        "1.5 MiB body",
        caller.post(alice, data=big, headers=headers, label="big"),
        413,
        "body_too_large",
    )
    caller.expect(
        "1.5 MiB body, chunked (no length)",
        caller.post(
            alice,
            data=(big[i : i + 65536] for i in range(0, len(big), 65536)),
            headers=headers,
        ),
        413,
        "body_too_large",
    )
    caller.expect(
        "10 MiB body (read and thrown away)",
        caller.post(alice, data=b"[" * (10 * MIB), headers=headers),
        413,
        "body_too_large",
    )
    # past 16 times the limit the service closes the connection rather than
    # read on (by design); the proxy then answers with its own page
    huge = caller.post(alice, data=b"[" * (40 * MIB), headers=headers)
    caller.rows.append(("40 MiB body", "refused (413, or closed)", huge.code))
    assert huge.status is None or huge.status in (413, 502, 503), huge.code
    health = caller.post(None, path="api/health", method="GET")
    assert health.status == 200, health.code
    caller.expect(
        "text/plain body",
        caller.post(alice, data=b"{}", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    caller.expect(
        "deeply nested JSON",
        caller.post(alice, data=b"[" * 100_000, headers=headers),
        400,
        "invalid_transfer",
    )

    def items(count: int, folders: int) -> list[dict[str, t.Any]]:
        return [
            {
                "source_path": f"/data/{i}",
                "destination_path": f"/alice/many/{i % folders}/{i}",
            }
            for i in range(count)
        ]

    caller.expect(
        "1000 items, one directory",
        caller.post(alice, caller.document("alice", items=items(1000, 1))),
        201,
    )
    caller.expect(
        "1001 items",
        caller.post(alice, caller.document("alice", items=items(1001, 1))),
        400,
        "invalid_transfer",
    )
    caller.expect(
        "1000 items, 25 directories",
        caller.post(alice, caller.document("alice", items=items(1000, 25))),
        400,
        "too_many_directories",
    )
    elsewhere = [
        {"source_path": f"/data/{i}", "destination_path": f"/copy/{i}"}
        for i in range(1000)
    ]
    caller.expect(
        "1000 items, not on the collection",
        caller.post(
            alice, caller.document("alice", items=elsewhere, into_collection=False)
        ),
        201,
    )


def test_rule_quota(caller: Caller) -> None:
    """Twenty directories a transfer, three transfers: past the 50-rule quota
    of one Globus identity, the third is refused before any rule is made."""
    hub = caller.hub
    erin = hub.server_token("erin")
    before = len(hub.rules())
    answers = []
    for batch in range(3):
        answers.append(
            caller.post(
                erin,
                caller.document(
                    "erin",
                    items=[
                        {
                            "source_path": f"/data/{i}",
                            "destination_path": f"/erin/q{batch}/{i}/f",
                        }
                        for i in range(20)
                    ],
                ),
            )
        )
    caller.expect("rule quota: 20 directories (1)", answers[0], 201)
    caller.expect("rule quota: 20 directories (2)", answers[1], 201)
    refused = caller.expect(
        "rule quota: 20 directories (3)", answers[2], 429, "acl_user_quota"
    )
    assert refused.headers.get("Retry-After", "").isdigit(), refused.headers
    assert len(hub.rules()) == before + 40


# ----------------------------------------------------------------------
# limits and CORS


def test_per_user_limits(caller: Caller) -> None:
    hub = caller.hub
    globus = hub.globus
    carol = hub.server_token("carol")

    # concurrency: Globus slow, eight at once from one user
    globus.standin.set_latency(1.0)
    try:
        at_once = run_many(
            lambda i: caller.post(
                carol, caller.document("carol", into_collection=False)
            ),
            8,
            8,
        )
    finally:
        globus.standin.set_latency(0)
    crowded = [o for o in at_once if o.code == "429 too_many_concurrent"]
    caller.rows.append(
        (
            "8 at once from one user",
            "201 x4, 429 x4",
            histogram(o.code for o in at_once),
        )
    )
    assert len([o for o in at_once if o.kind == "created"]) >= 1
    assert crowded, histogram(o.code for o in at_once)
    for outcome in crowded:
        assert outcome.headers.get("Retry-After", "").isdigit(), outcome.headers
    for outcome in at_once:
        assert outcome.code in ("201", "429 too_many_concurrent"), outcome.code

    # rate: 61 quick submissions (a bad Globus token keeps them cheap)
    dave = hub.server_token("dave")
    codes = []
    limited = None
    for _ in range(61):
        outcome = caller.post(dave, caller.document("dave", token="bad-token"))
        codes.append(outcome.code)
        if outcome.code == "429 rate_limited":
            limited = outcome
    caller.rows.append(("61 in a minute from one user", "429 on the 61st", codes[-1]))
    assert codes[:60] == ["401 globus_token_inactive"] * 60, histogram(codes[:60])
    assert limited is not None and codes[-1] == "429 rate_limited", codes[-1]
    assert int(limited.headers.get("Retry-After", "0")) > 0, limited.headers


def test_no_cors(caller: Caller) -> None:
    hub = caller.hub
    origin = {"Origin": "https://evil.example"}
    preflight = caller.post(
        None,
        method="OPTIONS",
        headers={**origin, "Access-Control-Request-Method": "POST"},
    )
    posted = caller.post(
        hub.server_token("alice"), caller.document("alice"), headers=origin
    )
    for outcome in (preflight, posted):
        leaked = [h for h in outcome.headers if h.lower().startswith("access-control")]
        assert not leaked, leaked
    caller.rows.append(("CORS headers for a foreign origin", "none", "none"))


def test_nothing_left_behind(caller: Caller) -> None:
    """Refused requests made no rule: once the accepted ones end, none is left."""
    hub = caller.hub
    settle_s = hub.settle("hostile-", timeout=30)
    caller.rows.append(("rules after the tasks ended", "0", f"0 after {settle_s:.1f}s"))


def test_concurrent_strangers_do_not_starve_users(caller: Caller) -> None:
    """Forged tokens in bulk cost the hub a lookup each; a real user's request
    meanwhile still gets through."""
    hub = caller.hub
    stop = threading.Event()
    stranger_answers: list[str] = []

    def stranger() -> None:
        while not stop.is_set() and len(stranger_answers) < 400:
            outcome = caller.post("forged-" + uuid.uuid4().hex, caller.document("bob"))
            stranger_answers.append(outcome.code)

    threads = [threading.Thread(target=stranger, daemon=True) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        started = time.monotonic()
        mine = caller.post(hub.server_token("bob"), caller.document("bob"))
        took = time.monotonic() - started
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    caller.rows.append(
        (
            f"user amid {len(stranger_answers)} forged-token requests",
            "201",
            f"{mine.code} in {took:.2f}s",
        )
    )
    assert set(stranger_answers) == {"401 hub_auth_required"}, histogram(
        stranger_answers
    )
    caller.expect("user amid forged-token requests", mine, 201)
    hub.settle("hostile-", timeout=30)
