"""The HTTP contract, in-process: hub identity, body checks, answers, errors."""

from __future__ import annotations

import asyncio
import logging

import pytest

from hub_transfer.errors import ServiceError

from .conftest import DESTINATION, SOURCE, transfer_body


async def test_submit_returns_task_id(api, submitter):
    status, body, _ = await api.submit(transfer_body())

    assert status == 201
    assert body["task_id"] == "task-1"
    assert body["submission_id"] == "sub-1"
    user, document = submitter.submitted[0]
    assert document.source_endpoint == SOURCE
    assert document.destination_endpoint == DESTINATION
    assert [i.destination_path for i in document.items] == ["~/", "~/bar"]
    assert [i.recursive for i in document.items] == [False, True]
    assert document.label == "from JupyterLab"


async def test_submit_at_api_transfers_and_seed_alias(api, submitter):
    body = transfer_body(
        DATA=[{"source_path": "/a", "destination": "~/a", "recursive": False}]
    )
    status, answer, _ = await api.request("POST", "api/transfers", body=body)

    assert status == 201, answer
    assert submitter.submitted[0][1].items[0].destination_path == "~/a"


@pytest.mark.parametrize(
    "token, status, error",
    [
        (None, 401, "hub_auth_required"),
        ("not-a-hub-token", 401, "hub_auth_required"),
        ("bob-no-access", 403, "hub_access_denied"),
    ],
)
async def test_hub_identity_is_required(api, submitter, token, status, error):
    code, body, _ = await api.submit(transfer_body(), token=token)

    assert code == status
    assert body["error"] == error
    assert body["status"] == status
    assert submitter.submitted == []


async def test_token_scheme_is_accepted_too(api):
    status, body, _ = await api.submit(
        transfer_body(),
        token=None,
        headers={"Authorization": "token alice-server-token"},
    )
    assert status == 201, body


def _without(key):
    body = transfer_body()
    del body["transfer"][key]
    return body


@pytest.mark.parametrize(
    "body, field",
    [
        (b"{not json", "body"),
        (b"[]", "body"),
        (b'{"globus_token": "good"}', "transfer"),
        ({"globus_token": "good", "transfer": []}, "transfer"),
        (_without("source_endpoint"), "transfer.source_endpoint"),
        (transfer_body(source_endpoint="not-a-uuid"), "transfer.source_endpoint"),
        (
            transfer_body(destination_endpoint="{" + DESTINATION + "}"),
            "transfer.destination_endpoint",
        ),
        (transfer_body(DATA=[]), "transfer.DATA"),
        (transfer_body(DATA={"source_path": "/a"}), "transfer.DATA"),
        (transfer_body(DATA=["/a"]), "transfer.DATA[0]"),
        (
            transfer_body(DATA=[{"destination_path": "/b"}]),
            "transfer.DATA[0].source_path",
        ),
        (
            transfer_body(DATA=[{"source_path": "/a"}]),
            "transfer.DATA[0].destination_path",
        ),
        (
            transfer_body(
                DATA=[{"source_path": "/a", "destination_path": "/b", "recursive": "y"}]
            ),
            "transfer.DATA[0].recursive",
        ),
        (
            transfer_body(DATA=[{"source_path": "/a\x00", "destination_path": "/b"}]),
            "transfer.DATA[0].source_path",
        ),
        (transfer_body(label="x" * 129), "transfer.label"),
        (transfer_body(label="two\nlines"), "transfer.label"),
        (transfer_body(label=5), "transfer.label"),
        ({"globus_token": 5, "transfer": transfer_body()["transfer"]}, "globus_token"),
    ],
)
async def test_bad_documents_get_400_naming_the_field(api, submitter, body, field):
    raw = body if isinstance(body, bytes) else None
    status, answer, _ = await api.submit(body if raw is None else None, raw=raw)

    assert status == 400, answer
    assert answer["error"] == "invalid_transfer"
    assert answer["field"] == field
    assert answer["message"]
    assert submitter.submitted == []


async def test_too_many_items(api, submitter):
    submitter.max_items = 3
    items = [{"source_path": f"/f{i}", "destination_path": "/d/"} for i in range(4)]
    status, answer, _ = await api.submit(transfer_body(DATA=items))

    assert status == 400
    assert answer["field"] == "transfer.DATA"
    assert "at most 3" in answer["message"]


async def test_label_is_optional_and_trimmed(api, submitter):
    body = transfer_body()
    del body["transfer"]["label"]
    assert (await api.submit(body))[0] == 201
    assert (await api.submit(transfer_body(label=None)))[0] == 201
    assert (await api.submit(transfer_body(label="  spaced  ")))[0] == 201

    labels = [document.label for _, document in submitter.submitted]
    assert labels == [None, None, "spaced"]


async def test_oversized_body_gets_json_413(api, hub_app, submitter):
    raw = b'{"globus_token": "good", "pad": "' + b"x" * hub_app.max_body_size + b'"}'
    status, answer, _ = await api.submit(raw=raw)

    assert status == 413
    assert answer["error"] == "body_too_large"
    assert submitter.submitted == []


async def test_wrong_content_type_is_415(api):
    status, answer, _ = await api.submit(
        transfer_body(), headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    assert answer["error"] == "unsupported_media_type"


async def test_missing_globus_token_is_401(api, submitter):
    body = transfer_body()
    del body["globus_token"]
    status, answer, _ = await api.submit(body)

    assert status == 401
    assert answer["error"] == "globus_token_missing"
    assert submitter.submitted == []


async def test_expired_globus_token_is_401(api, submitter):
    body = transfer_body()
    body["globus_token"] = "expired-token"
    status, answer, _ = await api.submit(body)

    assert status == 401
    assert answer["error"] == "globus_token_expired"


async def test_globus_refusal_keeps_its_details(api, submitter):
    submitter.fail_submit = ServiceError(
        403,
        "consent_required",
        "Globus needs more consent.",
        globus_code="ConsentRequired",
        request_id="r-123",
        required_scopes=["urn:globus:auth:scope:transfer.api.globus.org:all[*x]"],
    )
    status, answer, _ = await api.submit(transfer_body())

    assert status == 403
    assert answer["error"] == "consent_required"
    assert answer["globus_code"] == "ConsentRequired"
    assert answer["request_id"] == "r-123"
    assert answer["required_scopes"]


async def test_unexpected_failure_is_json_500_without_traceback(api, submitter):
    async def broken(*args, **kwargs):
        raise RuntimeError("secret-bearing internals")

    submitter.submit = broken
    status, answer, response = await api.submit(transfer_body())

    assert status == 500
    assert answer["error"] == "internal_error"
    assert "secret-bearing" not in response.body.decode()
    assert "Traceback" not in response.body.decode()


async def test_no_token_in_logs_or_answers(api, submitter):
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    collector = Collect()
    watched = [logging.getLogger(n) for n in ("hub_transfer", "tornado")]
    for logger in watched:
        logger.addHandler(collector)
        logger.setLevel(logging.DEBUG)
    try:
        answers = []
        for token in ("good-SECRET-1", "expired-SECRET-2", "bad-SECRET-3"):
            body = transfer_body()
            body["globus_token"] = token
            answers.append((await api.submit(body))[2].body.decode())
        answers.append((await api.submit(transfer_body(), token="hubSECRET"))[2].body)
    finally:
        for logger in watched:
            logger.removeHandler(collector)

    assert records, "the service should have logged something"
    for text in records + [str(a) for a in answers]:
        assert "SECRET" not in text


async def test_health_needs_no_auth(api):
    status, body, _ = await api.request("GET", "api/health", token=None)
    assert status == 200
    assert body["status"] == "ok"


async def test_root_describes_service_for_hub_user(api):
    status, body, _ = await api.request("GET", "")
    assert status == 200
    assert body["user"] == "alice"
    assert body["service"] == "hub-transfer"


async def test_root_redirects_browsers_and_refuses_bad_tokens(api):
    status, _, response = await api.request("GET", "", token=None)
    assert status == 302
    assert "oauth2/authorize" in response.headers["Location"]

    status, body, _ = await api.request("GET", "", token="bob-no-access")
    assert status == 403
    assert body["error"] == "hub_access_denied"


async def test_unknown_route_and_method_are_json(api):
    status, body, _ = await api.request("DELETE", "api/transfers")
    assert status == 405
    assert body["error"] == "method_not_allowed"


async def test_per_user_concurrency_limit_is_429(api, hub_app, submitter):
    hub_app.limits.max_concurrent = 1
    release = asyncio.Event()
    original = submitter.submit

    async def slow(*args):
        await release.wait()
        return await original(*args)

    submitter.submit = slow
    first = asyncio.ensure_future(api.submit(transfer_body()))
    await asyncio.sleep(0.1)
    status, body, response = await api.submit(transfer_body())
    release.set()

    assert status == 429
    assert body["error"] == "too_many_concurrent"
    assert response.headers["Retry-After"] == "1"
    assert (await first)[0] == 201


async def test_per_user_rate_limit_is_429(api, hub_app):
    hub_app.limits.per_minute = 2
    assert (await api.submit(transfer_body()))[0] == 201
    assert (await api.submit(transfer_body()))[0] == 201
    status, body, response = await api.submit(transfer_body())

    assert status == 429
    assert body["error"] == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1


async def test_deadline_gives_504(api, hub_app, submitter):
    # the app is built: change the kwarg its routes hand to handlers
    for rule in hub_app.tornado_app.wildcard_router.rules:
        if "request_timeout" in (rule.target_kwargs or {}):
            rule.target_kwargs["request_timeout"] = 0.2

    async def hang(*args):
        await asyncio.sleep(5)

    submitter.submit = hang
    status, body, _ = await api.submit(transfer_body())

    assert status == 504
    assert body["error"] == "deadline_exceeded"


@pytest.mark.parametrize(
    "template, allowed",
    [("", True), ("{username}@example.org", False), ("ALICE@example.org", True)],
)
async def test_identity_binding(api, hub_app, submitter, template, allowed):
    # the fake submitter's Globus user is alice@example.org; the hub user alice
    hub_app.binding.globus_username_template = template.replace("ALICE", "{username}")
    if template == "{username}@example.org":
        hub_app.binding.globus_username_template = "{username}@other.org"
    status, body, _ = await api.submit(transfer_body())

    if allowed:
        assert status == 201, body
    else:
        assert status == 403
        assert body["error"] == "identity_mismatch"
        assert submitter.submitted == []


async def test_identity_binding_callable(api, hub_app):
    seen = []

    def check(hub_user, globus_username, identity_ids):
        seen.append((hub_user["name"], globus_username, identity_ids))
        return False

    hub_app.binding.check = check
    status, body, _ = await api.submit(transfer_body())

    assert status == 403
    assert seen[0][:2] == ("alice", "alice@example.org")


async def test_metrics_for_admins_and_token_only(api, hub_app, hub_users):
    hub_users["admin-token"] = {
        "kind": "user",
        "name": "root",
        "admin": True,
        "groups": [],
        "scopes": ["access:services!service=hub-transfer"],
    }
    await api.submit(transfer_body())

    status, body, _ = await api.request("GET", "metrics")
    assert status == 403

    status, _, response = await api.request("GET", "metrics", token="admin-token")
    assert status == 200
    text = response.body.decode()
    assert 'hub_transfer_requests_total{method="POST"' in text
    assert "hub_transfer_cache_events" in text


async def test_metrics_token(api, hub_app):
    for rule in hub_app.tornado_app.wildcard_router.rules:
        if "metrics_token" in (rule.target_kwargs or {}):
            rule.target_kwargs["metrics_token"] = "scrape-me"
    response = (await api.request("GET", "metrics", token="scrape-me"))[2]
    assert response.code == 200
    response = (await api.request("GET", "metrics", token="scrape-you"))[2]
    assert response.code == 401


async def test_cors_is_closed_by_default(api):
    status, _, response = await api.submit(
        transfer_body(), headers={"Origin": "https://evil.example"}
    )
    assert status == 201
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_deeply_nested_json_is_400_not_500(api):
    raw = (
        b'{"globus_token": "good", "transfer": ' + b"[" * 200000 + b"]" * 200000 + b"}"
    )
    status, body, _ = await api.submit(raw=raw[:1_000_000])
    assert status == 400
    assert body["error"] == "invalid_transfer"


async def test_failed_request_logs_one_line_with_the_detail(api, submitter):
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    submitter.fail_submit = ServiceError(
        403,
        "consent_required",
        "More consent.",
        globus_code="ConsentRequired",
        request_id="rq-9",
    )
    collector = Collect()
    access = logging.getLogger("tornado.access")
    access.addHandler(collector)
    try:
        await api.submit(transfer_body())
    finally:
        access.removeHandler(collector)

    [line] = [r for r in records if r.levelno == logging.WARNING]
    text = line.getMessage()
    assert "403 POST" in text and "(alice@" in text
    assert "error=consent_required" in text
    assert "globus_code=ConsentRequired" in text and "request_id=rq-9" in text


async def test_shutdown_answers_requests_still_in_flight(api, hub_app, submitter):
    hub_app.shutdown_grace = 0.2

    async def hang(*args):
        await asyncio.sleep(30)

    # hung before the submit: safe to cut (a submit under way is left to finish)
    submitter.user_credential = hang
    pending = asyncio.ensure_future(api.submit(transfer_body()))
    await asyncio.sleep(0.2)
    assert hub_app.pending_requests() == 1

    await hub_app.shutdown()
    status, body, response = await pending

    assert status == 503
    assert body["error"] == "service_stopping"
    assert response.headers["Retry-After"]


async def test_shutdown_lets_quick_requests_finish(api, hub_app, submitter):
    original = submitter.submit

    async def slowish(*args):
        await asyncio.sleep(0.3)
        return await original(*args)

    submitter.submit = slowish
    pending = asyncio.ensure_future(api.submit(transfer_body()))
    await asyncio.sleep(0.1)

    await hub_app.shutdown()
    assert (await pending)[0] == 201


async def test_unknown_paths_are_json_404(api):
    status, body, _ = await api.request("GET", "api/nothing-here", token=None)
    assert status == 404
    assert body["error"] == "not_found"


@pytest.mark.parametrize("char", ["\u2028", "\u0085", "\u202e", "\x9b"])
async def test_paths_with_line_separators_or_bidi_controls_are_400(api, char):
    body = transfer_body(
        DATA=[{"source_path": f"/a{char}b", "destination_path": "/d/"}]
    )
    status, answer, _ = await api.submit(body)
    assert status == 400
    assert answer["field"] == "transfer.DATA[0].source_path"


@pytest.mark.parametrize("query", ["offset=99999999999999999999999", "limit=%C2%B2"])
async def test_paging_arguments_are_checked(api, query):
    status, body, _ = await api.request("GET", f"api/transfers?{query}")
    assert status == 400
    assert body["error"] == "invalid_argument"


async def test_hub_services_may_not_submit(api, hub_users, submitter):
    hub_users["service-token"] = {
        "kind": "service",
        "name": "alice",
        "scopes": ["access:services!service=hub-transfer"],
    }
    status, body, _ = await api.submit(transfer_body(), token="service-token")
    assert status == 403
    assert body["error"] == "users_only"
    assert submitter.submitted == []


async def test_a_hanging_hub_gets_504_in_bounded_time(api, hub_app, fake_hub_auth):
    hub_app.tornado_app.settings["hub_timeout"] = 0.3

    def hang(token, use_cache=True, session_id="", *, sync=True):
        return asyncio.sleep(30)

    fake_hub_auth.user_for_token = hang
    status, body, _ = await api.submit(transfer_body())
    assert status == 504
    assert body["error"] == "hub_unavailable"


async def test_bugs_are_logged_without_the_query_string(api, submitter):
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(self.format(record) + str(record.exc_info))

    async def broken(*args):
        raise RuntimeError("boom")

    submitter.submit = broken
    collector = Collect()
    watched = [logging.getLogger(n) for n in ("hub_transfer", "tornado")]
    for logger in watched:
        logger.addHandler(collector)
    try:
        status, _, _ = await api.request(
            "POST", "?token=SECRET-IN-QUERY", body=transfer_body()
        )
    finally:
        for logger in watched:
            logger.removeHandler(collector)
    assert status == 500
    assert any("boom" in r for r in records)
    assert not any("SECRET" in r for r in records)
