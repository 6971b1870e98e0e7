"""The stand-in's control API, independent of HTTP.

``control_dispatch`` maps ``(method, path, body, query)`` to a state call and
returns ``(status, payload)``.  The Tornado ``ControlHandler`` serves it under
``/_standin/``, and the in-thread stand-in calls it directly, so both ways of
driving the stand-in accept exactly the same requests.
"""

from __future__ import annotations

import logging
import re
import typing as t

from .standin_state import (
    ControlError,
    StandInError,
    StandInState,
    Token,
)

log = logging.getLogger(__name__)

Body = dict[str, t.Any]
Query = dict[str, str]
Result = tuple[int, t.Any]
Route = t.Callable[[StandInState, re.Match[str], Body, Query], Result]

_ROUTES: list[tuple[str, re.Pattern[str], Route]] = []


def _route(method: str, pattern: str) -> t.Callable[[Route], Route]:
    """Register a control operation for ``method`` and a path regex."""

    def register(func: Route) -> Route:
        _ROUTES.append((method, re.compile(pattern), func))
        return func

    return register


def control_dispatch(
    state: StandInState,
    method: str,
    path: str,
    body: t.Any = None,
    query: Query | None = None,
) -> Result:
    """Run one control request; errors come back as ``{"error", "message"}``."""
    path = path.strip("/")
    if body is None:
        body = {}
    if not isinstance(body, dict):
        return 400, {"error": "BadBody", "message": "body must be a JSON object"}

    known_path = False
    for route_method, pattern, func in _ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        known_path = True
        if route_method != method.upper():
            continue

        try:
            return func(state, match, body, query or {})
        except StandInError as err:
            return err.status, {"error": err.code, "message": err.message}

    if known_path:
        return 405, {"error": "BadMethod", "message": f"{method} not allowed"}
    return 404, {"error": "NotFound", "message": f"no control path /{path}"}


def _field(
    body: Body,
    name: str,
    kind: type | tuple[type, ...],
    default: t.Any = None,
    *,
    required: bool = False,
) -> t.Any:
    """Read one typed body field, rejecting the wrong JSON type early."""
    if name not in body or body[name] is None:
        if required:
            raise ControlError(400, "MissingField", f"{name} is required")
        return default

    value = body[name]
    bad_bool = isinstance(value, bool) and bool not in _as_tuple(kind)
    if bad_bool or not isinstance(value, kind):
        raise ControlError(400, "BadField", f"{name} has the wrong type")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _token_view(state: StandInState, token: Token) -> dict[str, t.Any]:
    view = token.to_dict(state.now())
    view["refresh_token"] = token.refresh_token
    return view


@_route("GET", r"")
def _summary(state: StandInState, match: re.Match[str], body: Body, q: Query) -> Result:
    return 200, state.summary()


@_route("GET", r"settings")
def _get_settings(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    return 200, state.settings()


@_route("POST", r"settings")
def _set_settings(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    return 200, state.configure(**body)


@_route("POST", r"latency")
def _latency(state: StandInState, match: re.Match[str], body: Body, q: Query) -> Result:
    seconds = _field(body, "seconds", (int, float), required=True)
    return 200, state.configure(latency=seconds)


@_route("POST", r"clock")
def _clock(state: StandInState, match: re.Match[str], body: Body, q: Query) -> Result:
    seconds = _field(body, "advance", (int, float), required=True)
    return 200, {"now": state.advance_clock(seconds)}


@_route("POST", r"reset")
def _reset(state: StandInState, match: re.Match[str], body: Body, q: Query) -> Result:
    state.reset()
    return 200, {"reset": True}


@_route("GET", r"clients")
def _list_clients(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    with state.lock:
        clients = [client.to_dict() for client in state.clients.values()]
    return 200, clients


@_route("POST", r"clients")
def _create_client(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    options = {
        "client_id": _field(body, "client_id", str),
        "client_secret": _field(body, "client_secret", str),
        "name": _field(body, "name", str),
        "scope_suffix": _field(body, "scope_suffix", str, "transfer_submit"),
        "dependent_scopes": _field(body, "dependent_scopes", list),
        "access_manager_of": _field(body, "access_manager_of", list, []),
    }
    if _field(body, "seed", bool, False):
        client = state.add_seed_client(**options)
    else:
        client = state.create_client(**options)
    return 201, client.to_dict()


@_route("GET", r"identities")
def _list_identities(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    with state.lock:
        identities = [identity.to_dict() for identity in state.identities.values()]
    return 200, identities


@_route("POST", r"identities")
def _create_identity(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    identity = state.create_identity(
        _field(body, "username", str, required=True),
        name=_field(body, "name", str),
        email=_field(body, "email", str),
        identity_id=_field(body, "identity_id", str),
        organization=_field(body, "organization", str),
    )
    return 201, identity.to_dict()


@_route("POST", r"identities/([^/]+)/consent_required")
def _consent_required(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    identity = state.set_consent_required(
        match.group(1),
        _field(body, "value", bool, True),
        _field(body, "collections", list, []),
    )
    return 200, identity.to_dict()


@_route("POST", r"tokens")
def _issue_token(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    who = (
        _field(body, "identity_id", str)
        or _field(body, "username", str)
        or _field(body, "identity", str)
    )
    if not who:
        raise ControlError(400, "MissingField", "identity_id or username is required")

    token = state.issue_user_token(
        who,
        scope=_field(body, "scope", str),
        client_id=_field(body, "client_id", str),
        issued_to=_field(body, "issued_to", str),
        expires_in=_field(body, "expires_in", int),
        active=_field(body, "active", bool, True),
        refresh=_field(body, "refresh", bool, False),
    )
    return 201, _token_view(state, token)


@_route("POST", r"tokens/revoke")
def _revoke_token(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    revoked = state.revoke_token(_field(body, "token", str, required=True))
    return 200, {"revoked": revoked}


@_route("POST", r"tokens/update")
def _update_token(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    token = state.update_token(
        _field(body, "token", str, required=True),
        expires_in=_field(body, "expires_in", int),
        active=_field(body, "active", bool),
    )
    return 200, _token_view(state, token)


@_route("POST", r"tokens/info")
def _token_info(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    return 200, state.token_info(_field(body, "token", str, required=True))


@_route("GET", r"tasks")
def _list_tasks(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    return 200, state.all_tasks()


@_route("POST", r"tasks/([^/]+)/status")
def _task_status(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    task = state.set_task_status(
        match.group(1),
        _field(body, "status", str, required=True),
        nice_status=_field(body, "nice_status", str),
        fatal_error=_field(body, "fatal_error", dict),
        fields=_field(body, "fields", dict),
    )
    return 200, task


@_route("GET", r"acl/([^/]+)")
def _list_acl(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    return 200, state.all_acl_rules(match.group(1))


@_route("POST", r"acl/([^/]+)")
def _plant_acl(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    rule = {"DATA_TYPE": "access", "principal_type": "identity", **body}
    rule.setdefault("permissions", "r")
    return 201, state.plant_acl_rule(match.group(1), rule)


@_route("POST", r"access_managers")
def _access_manager(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    manager = _field(body, "client_id", str) or _field(body, "identity_id", str)
    if not manager:
        raise ControlError(400, "MissingField", "client_id or identity_id is required")
    endpoint_id = _field(body, "endpoint_id", str, required=True)
    state.add_access_manager(endpoint_id, manager)
    return 200, {"endpoint_id": endpoint_id, "manager": manager}


@_route("GET", r"calls")
def _list_calls(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    return 200, state.calls(q.get("operation"))


@_route("POST", r"calls/clear")
def _clear_calls(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    state.clear_calls()
    return 200, {"cleared": True}


@_route("DELETE", r"calls")
def _delete_calls(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    state.clear_calls()
    return 200, {"cleared": True}


@_route("GET", r"faults")
def _list_faults(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    with state.lock:
        faults = [fault.to_dict() for fault in state.faults]
    return 200, faults


@_route("POST", r"faults")
def _add_fault(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    fault = state.add_fault(
        _field(body, "operation", str, "*"),
        status=_field(body, "status", int),
        code=_field(body, "code", str),
        message=_field(body, "message", str),
        count=_field(body, "count", int),
        probability=_field(body, "probability", (int, float)),
        hang=_field(body, "hang", (int, float)),
        drop=_field(body, "drop", bool, False),
        retry_after=_field(body, "retry_after", int),
    )
    return 201, fault.to_dict()


@_route("DELETE", r"faults")
def _clear_faults(
    state: StandInState, match: re.Match[str], body: Body, q: Query
) -> Result:
    state.clear_faults()
    return 200, {"cleared": True}
