"""Tornado handlers of the stand-in: Globus Auth, Globus Transfer, control API.

The handlers only translate HTTP to ``StandInState`` calls and back; every
rule lives in the state.  What they add is what only HTTP can do: latency,
injected faults (hangs, dropped connections, error statuses) and the call
log that tests read to see what the service under test really sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import time
import typing as t

import tornado.httputil
import tornado.web

from .standin_control import control_dispatch
from .standin_state import (
    Fault,
    OAuthError,
    RegisteredClient,
    StandInError,
    StandInState,
    Token,
    TransferError,
    new_request_id,
)

log = logging.getLogger(__name__)

API_VERSION_PREFIX = "/transfer/v0.10"

# Result documents of Transfer carry request_id and resource like errors do.
_RESULT_TYPES = frozenset({"transfer_result", "access_create_result", "result"})

_TRANSFER_DEFAULT_CODES = {
    400: "ClientError.BadRequest",
    401: "AuthenticationFailed",
    403: "PermissionDenied",
    404: "ClientError.NotFound",
    405: "ClientError.BadMethod",
    409: "Conflict",
    429: "RateLimitExceeded",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}
_AUTH_DEFAULT_ERRORS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    429: "too_many_requests",
    500: "server_error",
    503: "temporarily_unavailable",
}
_GRANT_OPERATIONS = {
    "client_credentials": "client_credentials",
    "urn:globus:auth:grant_type:dependent_token": "dependent_token",
    "refresh_token": "refresh_token",
}

Action = t.Callable[[], tuple[int, t.Any]]


def default_error_code(service: str, status: int) -> str:
    """The code a fault or framework error gets when the test names none."""
    if service == "auth":
        return _AUTH_DEFAULT_ERRORS.get(status, "server_error")
    return _TRANSFER_DEFAULT_CODES.get(status, "Error")


class _ServiceHandler(tornado.web.RequestHandler):
    """Shared behaviour of the Auth and Transfer endpoints.

    ``prepare`` applies latency and faults before any real work so that a
    faulted call never touches state; ``on_finish`` logs every answered call.
    """

    service: str = "transfer"
    operations: t.ClassVar[dict[str, str]] = {}

    def initialize(self, state: StandInState) -> None:
        self.state = state
        self.operation = "unknown"
        self.call_client_id: str | None = None
        self.call_identity_id: str | None = None
        self.fault: Fault | None = None
        self.short_circuited = False
        self._recorded = False
        self._started = time.monotonic()
        self._started_at = time.time()

    def operation_for_request(self) -> str:
        return self.operations.get(self.request.method or "", "unknown")

    async def prepare(self) -> None:
        self.operation = self.operation_for_request()

        if self.state.latency > 0:
            await asyncio.sleep(self.state.latency)

        fault = self.state.take_fault(self.operation)
        if fault is None:
            return
        self.fault = fault
        if fault.hang:
            await asyncio.sleep(fault.hang)

        if fault.drop:
            self.short_circuited = True
            self._drop_connection()
            return
        if fault.status is not None:
            self.short_circuited = True
            if fault.retry_after is not None:
                self.set_header("Retry-After", str(fault.retry_after))
            self.send_error_document(
                StandInError(
                    fault.status,
                    fault.code or default_error_code(self.service, fault.status),
                    fault.message or f"Injected fault ({fault.status})",
                )
            )

    def _drop_connection(self) -> None:
        """Close the socket without a response, like a crashed proxy would."""
        log.info("stand-in dropping connection for %s", self.operation)
        self.detach().close()
        self._record(None)

    def on_finish(self) -> None:
        self._record(self.get_status())

    def _record(self, status: int | None) -> None:
        """Log the call once; deliberately nothing from headers or bodies, so
        no token or secret can end up in the log."""
        if self._recorded:
            return
        self._recorded = True

        fault = self.fault
        self.state.record_call(
            {
                "operation": self.operation,
                "service": self.service,
                "method": self.request.method,
                "path": self.request.path,
                "status": status,
                "time": self._started_at,
                "duration": time.monotonic() - self._started,
                "fault": None if fault is None else fault.id,
                "dropped": bool(fault and fault.drop),
                "client_id": self.call_client_id,
                "identity_id": self.call_identity_id,
            }
        )

    def resource(self) -> str:
        """The ``resource`` field of answers: the path below the API root."""
        path = self.request.path
        for prefix in (API_VERSION_PREFIX, "/transfer", "/auth"):
            if path.startswith(prefix):
                return path[len(prefix) :] or "/"
        return path

    def send_json(self, status: int, payload: t.Any) -> None:
        """Answer, recording the call first: once the bytes are out a test in
        another thread may already be reading the call log."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self._record(status)
        self.finish(json.dumps(payload))

    def send_error_document(self, err: StandInError) -> None:
        """Render an error the way the service it belongs to does."""
        request_id = new_request_id()
        if self.service == "auth":
            error = err.code
            body: dict[str, t.Any] = {
                "error": error,
                "error_description": err.message,
                "errors": [
                    {
                        "id": request_id,
                        "code": error.upper(),
                        "status": str(err.status),
                        "title": error.replace("_", " ").capitalize(),
                        "detail": err.message,
                    }
                ],
                "code": error.upper(),
                "message": err.message,
            }
        else:
            body = {"code": err.code, "message": err.message}
        body["request_id"] = request_id
        body["resource"] = self.resource()
        body.update(err.extra)
        self.send_json(err.status, body)

    def respond(self, action: Action) -> None:
        """Run one operation and answer with its result or its error."""
        try:
            status, payload = action()
        except StandInError as err:
            self.send_error_document(err)
            return

        if isinstance(payload, dict) and payload.get("DATA_TYPE") in _RESULT_TYPES:
            payload = {
                **payload,
                "request_id": new_request_id(),
                "resource": self.resource(),
            }
        self.send_json(status, payload)

    def write_error(self, status_code: int, **kwargs: t.Any) -> None:
        """Framework errors (405, uncaught exceptions) in the service's shape."""
        message = tornado.httputil.responses.get(status_code, "Error")
        exc_info = kwargs.get("exc_info")
        if exc_info and isinstance(exc_info[1], tornado.web.HTTPError):
            message = exc_info[1].log_message or message
        self.send_error_document(
            StandInError(
                status_code, default_error_code(self.service, status_code), message
            )
        )


class _AuthHandler(_ServiceHandler):
    service = "auth"

    def client(self) -> RegisteredClient:
        """The client authenticated by HTTP Basic, or a 401 ``invalid_client``."""
        client_id, client_secret = _basic_credentials(
            self.request.headers.get("Authorization", "")
        )
        client = self.state.authenticate_client(client_id, client_secret)
        self.call_client_id = client.client_id
        return client

    def form(self, name: str) -> str | None:
        return self.get_body_argument(name, None)


class TokenHandler(_AuthHandler):
    """``POST /v2/oauth2/token``: the grants a resource server uses."""

    def operation_for_request(self) -> str:
        return _GRANT_OPERATIONS.get(self.form("grant_type") or "", "token")

    def post(self) -> None:
        self.respond(self._grant)

    def _grant(self) -> tuple[int, t.Any]:
        client = self.client()
        grant = self.form("grant_type")

        if grant == "client_credentials":
            tokens = self.state.client_credentials_grant(client, self.form("scope"))
            self.call_identity_id = client.identity_id
            return 200, tokens

        if grant == "urn:globus:auth:grant_type:dependent_token":
            dependent = self.state.dependent_token_grant(
                client,
                self.form("token"),
                self.form("scope"),
                offline=self.form("access_type") == "offline",
            )
            return 200, dependent

        if grant == "refresh_token":
            refreshed = self.state.refresh_token_grant(
                client, self.form("refresh_token")
            )
            return 200, refreshed

        raise OAuthError(400, "unsupported_grant_type", f"Unsupported grant {grant}")


class IntrospectHandler(_AuthHandler):
    """``POST /v2/oauth2/token/introspect``."""

    operations = {"POST": "introspect"}

    def post(self) -> None:
        self.respond(self._introspect)

    def _introspect(self) -> tuple[int, t.Any]:
        client = self.client()
        token = self.form("token")
        if not token:
            raise OAuthError(400, "invalid_request", "token is required")

        result = self.state.introspect(client, token, self.form("include"))
        if result.get("active"):
            self.call_identity_id = result["sub"]
        return 200, result


class RevokeHandler(_AuthHandler):
    """``POST /v2/oauth2/token/revoke``."""

    operations = {"POST": "revoke"}

    def post(self) -> None:
        self.respond(self._revoke)

    def _revoke(self) -> tuple[int, t.Any]:
        client = self.client()
        self.state.revoke_by_client(client, self.form("token"))
        return 200, {"active": False}


class IdentitiesHandler(_AuthHandler):
    """``GET /v2/api/identities``; accepts Basic client auth or any valid
    Bearer token, which is all real Auth asks of it."""

    operations = {"GET": "identities"}

    def get(self) -> None:
        self.respond(self._identities)

    def _identities(self) -> tuple[int, t.Any]:
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            token = self.state.valid_token(value.strip())
            if token is None:
                raise OAuthError(401, "unauthorized", "Call must be authenticated")
            self.call_identity_id = token.identity_id
        else:
            self.client()

        ids = _comma_values(self.get_query_arguments("ids"))
        usernames = _comma_values(self.get_query_arguments("usernames"))
        return 200, {"identities": self.state.lookup_identities(ids, usernames)}


class _TransferHandler(_ServiceHandler):
    service = "transfer"

    def caller(self) -> Token:
        """The Bearer token's owner, or a 401 ``AuthenticationFailed``."""
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        presented = value.strip() if scheme.lower() == "bearer" else None
        token = self.state.transfer_caller(presented)
        self.call_identity_id = token.identity_id
        if token.identity_id in self.state.clients:
            self.call_client_id = token.identity_id
        return token

    def json_body(self) -> t.Any:
        try:
            return json.loads(self.request.body or b"null")
        except ValueError:
            raise TransferError(
                400, "ClientError.BadRequest", "Request body is not valid JSON"
            ) from None


class SubmissionIdHandler(_TransferHandler):
    operations = {"GET": "submission_id"}

    def get(self) -> None:
        self.respond(self._submission_id)

    def _submission_id(self) -> tuple[int, t.Any]:
        self.caller()
        value = self.state.new_submission_id()
        return 200, {"DATA_TYPE": "submission_id", "value": value}


class SubmitTransferHandler(_TransferHandler):
    operations = {"POST": "submit_transfer"}

    def post(self) -> None:
        self.respond(self._submit)

    def _submit(self) -> tuple[int, t.Any]:
        caller = self.caller()
        return self.state.submit_transfer(caller.identity_id, self.json_body())


class TaskHandler(_TransferHandler):
    operations = {"GET": "get_task"}

    def get(self, task_id: str) -> None:
        self.respond(lambda: (200, self.state.get_task(self._owner(), task_id)))

    def _owner(self) -> str:
        return self.caller().identity_id


class TaskCancelHandler(_TransferHandler):
    operations = {"POST": "cancel_task"}

    def post(self, task_id: str) -> None:
        self.respond(
            lambda: (200, self.state.cancel_task(self.caller().identity_id, task_id))
        )


class TaskListHandler(_TransferHandler):
    operations = {"GET": "task_list"}

    def get(self) -> None:
        self.respond(self._task_list)

    def _task_list(self) -> tuple[int, t.Any]:
        caller = self.caller()
        result = self.state.task_list(
            caller.identity_id,
            filters=self.get_query_arguments("filter"),
            limit=self.get_query_argument("limit", None),
            offset=self.get_query_argument("offset", None),
            orderby=self.get_query_argument("orderby", None),
        )
        return 200, result


class AccessListHandler(_TransferHandler):
    operations = {"GET": "acl_list"}

    def get(self, endpoint_id: str) -> None:
        self.respond(
            lambda: (200, self.state.acl_list(self.caller().identity_id, endpoint_id))
        )


class AccessCreateHandler(_TransferHandler):
    operations = {"POST": "acl_add"}

    def post(self, endpoint_id: str) -> None:
        self.respond(lambda: self._add(endpoint_id))

    def _add(self, endpoint_id: str) -> tuple[int, t.Any]:
        caller = self.caller()
        body = self.json_body()
        return 201, self.state.acl_add(caller.identity_id, endpoint_id, body)


class AccessRuleHandler(_TransferHandler):
    operations = {"GET": "acl_get", "PUT": "acl_update", "DELETE": "acl_delete"}

    def get(self, endpoint_id: str, rule_id: str) -> None:
        self.respond(
            lambda: (
                200,
                self.state.acl_get(self.caller().identity_id, endpoint_id, rule_id),
            )
        )

    def put(self, endpoint_id: str, rule_id: str) -> None:
        self.respond(lambda: self._update(endpoint_id, rule_id))

    def _update(self, endpoint_id: str, rule_id: str) -> tuple[int, t.Any]:
        caller = self.caller()
        body = self.json_body()
        return 200, self.state.acl_update(
            caller.identity_id, endpoint_id, rule_id, body
        )

    def delete(self, endpoint_id: str, rule_id: str) -> None:
        self.respond(
            lambda: (
                200,
                self.state.acl_delete(self.caller().identity_id, endpoint_id, rule_id),
            )
        )


class NotFoundHandler(_ServiceHandler):
    """Any other path: a JSON 404 that is still logged, so a test can spot
    the SDK calling something the stand-in does not implement."""

    async def prepare(self) -> None:
        path = self.request.path
        self.service = "auth" if path.startswith("/auth") else "transfer"
        await super().prepare()
        if self.short_circuited:
            return

        self.send_error_document(
            StandInError(
                404,
                default_error_code(self.service, 404),
                f"The stand-in does not implement {self.request.method} {path}",
            )
        )

    def _record(self, status: int | None) -> None:
        if not self.request.path.startswith("/_standin"):
            super()._record(status)


class ControlHandler(tornado.web.RequestHandler):
    """``/_standin/...``: JSON in, JSON out, loopback callers only."""

    def initialize(self, state: StandInState) -> None:
        self.state = state

    def prepare(self) -> None:
        if not _is_loopback(self.request.remote_ip):
            self._answer(403, {"error": "Forbidden", "message": "loopback only"})

    def get(self, path: str) -> None:
        self._dispatch(path)

    def post(self, path: str) -> None:
        self._dispatch(path)

    def put(self, path: str) -> None:
        self._dispatch(path)

    def delete(self, path: str) -> None:
        self._dispatch(path)

    def _dispatch(self, path: str) -> None:
        try:
            body = json.loads(self.request.body) if self.request.body else {}
        except ValueError:
            self._answer(400, {"error": "BadJSON", "message": "body is not JSON"})
            return

        query = {name: self.get_query_argument(name) for name in self.request.arguments}
        status, payload = control_dispatch(
            self.state, self.request.method or "GET", path, body, query
        )
        self._answer(status, payload)

    def _answer(self, status: int, payload: t.Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))

    def write_error(self, status_code: int, **kwargs: t.Any) -> None:
        reason = tornado.httputil.responses.get(status_code, "Error")
        self._answer(status_code, {"error": "Error", "message": reason})


def make_app(
    state: StandInState | None = None, latency: float = 0.0
) -> tornado.web.Application:
    """The stand-in as a Tornado application (Auth, Transfer and control API).

    ``latency`` (seconds) is added to every Auth/Transfer call; it overrides
    the state's setting only when non-zero.
    """
    if state is None:
        state = StandInState()
    if latency:
        state.configure(latency=latency)

    args = {"state": state}
    transfer = API_VERSION_PREFIX
    endpoint = r"endpoint/([^/]+)"
    routes = [
        (r"/auth/v2/oauth2/token/?", TokenHandler, args),
        (r"/auth/v2/oauth2/token/introspect/?", IntrospectHandler, args),
        (r"/auth/v2/oauth2/token/revoke/?", RevokeHandler, args),
        (r"/auth/v2/api/identities/?", IdentitiesHandler, args),
        (rf"{transfer}/submission_id/?", SubmissionIdHandler, args),
        (rf"{transfer}/transfer/?", SubmitTransferHandler, args),
        (rf"{transfer}/task_list/?", TaskListHandler, args),
        (rf"{transfer}/task/([^/]+)/cancel/?", TaskCancelHandler, args),
        (rf"{transfer}/task/([^/]+)/?", TaskHandler, args),
        (rf"{transfer}/{endpoint}/access_list/?", AccessListHandler, args),
        (rf"{transfer}/{endpoint}/access/?", AccessCreateHandler, args),
        (rf"{transfer}/{endpoint}/access/([^/]+)/?", AccessRuleHandler, args),
        (r"/_standin/?(.*)", ControlHandler, args),
    ]
    app = tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
    )
    app.settings["standin_state"] = state
    return app


def _basic_credentials(header: str) -> tuple[str | None, str | None]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    client_id, sep, secret = decoded.partition(":")
    return (client_id, secret) if sep else (None, None)


def _comma_values(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part]


def _is_loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False
