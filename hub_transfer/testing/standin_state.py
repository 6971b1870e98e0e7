"""In-memory model behind the Globus Auth + Transfer stand-in.

The model is plain Python with no HTTP in it, so the Tornado handlers, the
control API and in-process tests share one implementation of the rules: who
may introspect which token, which token may reach Transfer, who may edit an
endpoint's ACL, how idempotent submission works.  Anything that real Globus
would answer with a 4xx is raised as a ``StandInError`` carrying the HTTP
status and the Globus error code; the HTTP layer only renders it.

Every public method of ``StandInState`` takes ``StandInState.lock`` so the
state can be driven from a test thread while a server thread serves it.
"""

from __future__ import annotations

import base64
import collections
import copy
import dataclasses
import datetime
import functools
import logging
import random
import re
import secrets
import string
import threading
import time
import typing as t
import uuid

log = logging.getLogger(__name__)

TRANSFER_RESOURCE_SERVER = "transfer.api.globus.org"
TRANSFER_SCOPE = "urn:globus:auth:scope:transfer.api.globus.org:all"
AUTH_RESOURCE_SERVER = "auth.globus.org"
AUTH_ISSUER = "https://auth.globus.org"
CUSTOM_SCOPE_PREFIX = "https://auth.globus.org/scopes/"
CLIENT_USERNAME_DOMAIN = "clients.auth.globus.org"
DEFAULT_SCOPE_SUFFIX = "transfer_submit"
DEFAULT_EXPIRES_IN = 172800
DEFAULT_ACL_LIMIT = 1000
DEFAULT_TASK_LIST_LIMIT = 10
MAX_TASK_LIST_LIMIT = 1000
DEFAULT_DEADLINE_SECONDS = 86400
MAX_LABEL_LENGTH = 128
MAX_CALL_RECORDS = 100_000

TASK_STATUSES = ("ACTIVE", "INACTIVE", "SUCCEEDED", "FAILED")
ACL_PERMISSIONS = ("r", "rw")
PRINCIPAL_TYPES = ("identity", "group", "all_authenticated_users", "anonymous")

AUTH_OPERATIONS = frozenset(
    {
        "introspect",
        "client_credentials",
        "dependent_token",
        "refresh_token",
        "token",
        "revoke",
        "identities",
    }
)
TRANSFER_OPERATIONS = frozenset(
    {
        "submission_id",
        "submit_transfer",
        "get_task",
        "cancel_task",
        "task_list",
        "acl_list",
        "acl_get",
        "acl_add",
        "acl_update",
        "acl_delete",
    }
)
OPERATIONS = AUTH_OPERATIONS | TRANSFER_OPERATIONS | {"unknown"}

# A fault may name one operation, a whole service, or everything.
FAULT_TARGETS = OPERATIONS | {"*", "auth", "transfer"}

# Transfer options copied from a submission into the task document, with the
# value real Transfer reports when the submitter left them out.
_TASK_OPTION_DEFAULTS: dict[str, t.Any] = {
    "sync_level": None,
    "verify_checksum": False,
    "preserve_timestamp": False,
    "encrypt_data": False,
    "skip_source_errors": False,
    "fail_on_quota_errors": False,
    "delete_destination_extra": False,
    "notify_on_succeeded": True,
    "notify_on_failed": True,
    "notify_on_inactive": True,
    "source_local_user": None,
    "destination_local_user": None,
    "filter_rules": None,
    "recursive_symlinks": "ignore",
}
_BOOLEAN_OPTIONS = tuple(
    name for name, value in _TASK_OPTION_DEFAULTS.items() if isinstance(value, bool)
)

_F = t.TypeVar("_F", bound=t.Callable[..., t.Any])


class StandInError(Exception):
    """An answer other than success, in Globus terms.

    ``code`` is the Globus error code (Transfer style, e.g. ``TaskNotFound``)
    or the OAuth ``error`` value for ``OAuthError``; ``extra`` holds further
    top-level fields of the error document (e.g. ``required_scopes``).
    """

    def __init__(self, status: int, code: str, message: str, **extra: t.Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


class TransferError(StandInError):
    """Rendered as a Transfer error document (``code``, ``message``...)."""


class OAuthError(StandInError):
    """Rendered as a Globus Auth OAuth error (``error`` plus ``errors``)."""


class ControlError(StandInError):
    """A bad control API request: a mistake in the test, not a Globus answer."""


def _synchronized(method: _F) -> _F:
    """Run a ``StandInState`` method under the state's lock.

    Why: the in-thread variant serves HTTP from one thread while a test
    thread calls the control helpers; one re-entrant lock keeps each
    operation atomic without the handlers having to care.
    """

    @functools.wraps(method)
    def wrapper(self: StandInState, *args: t.Any, **kwargs: t.Any) -> t.Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return t.cast(_F, wrapper)


def iso_time(timestamp: float | None) -> str | None:
    """Format a Unix time the way Transfer does (``2021-09-02T18:04:47+00:00``)."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="seconds")


def parse_time(value: str) -> float:
    """Parse an ISO 8601 time; naive values are taken as UTC like Transfer does."""
    moment = datetime.datetime.fromisoformat(value.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def new_request_id() -> str:
    """A short random id, shaped like the ``request_id`` Globus services send."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


def new_secret_token() -> str:
    """An opaque bearer/refresh token value; never derived from anything."""
    return secrets.token_urlsafe(36)


def canonical_uuid(value: t.Any) -> str | None:
    """Return the canonical lower-case form of a UUID string, or None."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def split_scopes(value: str) -> list[str]:
    """Split a scope string on whitespace that is not inside brackets.

    Why: dependent-scope syntax such as ``a[b c]`` contains spaces that do
    not separate scopes.
    """
    scopes: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)

        if char.isspace() and depth == 0:
            if current:
                scopes.append("".join(current))
                current = []
            continue
        current.append(char)

    if current:
        scopes.append("".join(current))
    return scopes


def base_scope(scope: str) -> str:
    """Drop dependent-scope brackets and the optional ``*`` marker."""
    return scope.split("[", 1)[0].lstrip("*")


def resource_server_of(scope: str) -> str | None:
    """Derive the resource server a scope string belongs to, as Auth would."""
    base = base_scope(scope)
    if base in ("openid", "profile", "email"):
        return AUTH_RESOURCE_SERVER

    urn = re.fullmatch(r"urn:globus:auth:scope:([^:]+):.+", base)
    if urn:
        return urn.group(1)

    custom = re.fullmatch(re.escape(CUSTOM_SCOPE_PREFIX) + r"([^/]+)/.+", base)
    if custom:
        return custom.group(1)
    return None


def legacy_username(identity_id: str) -> str:
    """Transfer's deprecated ``username`` field for non-globusid identities."""
    raw = uuid.UUID(identity_id).bytes
    return "u_" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


@dataclasses.dataclass
class ScopeDef:
    """A scope Auth knows about: which resource server it is for, and which
    scopes a holder of it may get dependent tokens for."""

    scope_string: str
    resource_server: str
    dependent_scopes: list[str] = dataclasses.field(default_factory=list)
    owner_client_id: str | None = None

    def to_dict(self) -> dict[str, t.Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RegisteredClient:
    """A confidential client; its identity id equals its client id, as in Globus."""

    client_id: str
    client_secret: str
    name: str
    scopes: list[str] = dataclasses.field(default_factory=list)

    @property
    def identity_id(self) -> str:
        return self.client_id

    @property
    def username(self) -> str:
        return f"{self.client_id}@{CLIENT_USERNAME_DOMAIN}"

    def to_dict(self, *, include_secret: bool = True) -> dict[str, t.Any]:
        data: dict[str, t.Any] = {
            "client_id": self.client_id,
            "name": self.name,
            "identity_id": self.identity_id,
            "username": self.username,
            "scopes": list(self.scopes),
            "scope": self.scopes[0] if self.scopes else None,
        }
        if include_secret:
            data["client_secret"] = self.client_secret
        return data


@dataclasses.dataclass
class Identity:
    """A Globus identity, plus the stand-in's per-identity switches."""

    id: str
    username: str
    name: str | None
    email: str | None
    identity_provider: str
    organization: str | None = None
    consent_required: bool = False
    consent_collections: list[str] = dataclasses.field(default_factory=list)

    def auth_document(self) -> dict[str, t.Any]:
        """The record shape of ``GET /v2/api/identities``."""
        return {
            "id": self.id,
            "username": self.username,
            "name": self.name,
            "email": self.email,
            "identity_provider": self.identity_provider,
            "organization": self.organization,
            "status": "used",
        }

    def to_dict(self) -> dict[str, t.Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Token:
    """An access token and everything introspection can tell about it."""

    access_token: str
    identity_id: str
    issued_to: str
    scopes: list[str]
    resource_server: str
    issued_at: float
    expires_at: float
    grant: str
    active: bool = True
    refresh_token: str | None = None

    def is_valid(self, now: float) -> bool:
        return self.active and now < self.expires_at

    @property
    def audience(self) -> list[str]:
        """Who may introspect: the resource server and the requesting client."""
        return list(dict.fromkeys([self.resource_server, self.issued_to]))

    def to_dict(self, now: float) -> dict[str, t.Any]:
        return {
            "access_token": self.access_token,
            "identity_id": self.identity_id,
            "issued_to": self.issued_to,
            "scope": " ".join(self.scopes),
            "resource_server": self.resource_server,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "expires_in": max(int(self.expires_at - now), 0),
            "grant": self.grant,
            "active": self.active,
            "valid": self.is_valid(now),
            "has_refresh_token": self.refresh_token is not None,
        }


@dataclasses.dataclass
class RefreshToken:
    """A refresh token; it never expires but can be revoked."""

    value: str
    identity_id: str
    issued_to: str
    scopes: list[str]
    resource_server: str
    active: bool = True


@dataclasses.dataclass
class Task:
    """A submitted transfer task, with the submission exactly as received."""

    task_id: str
    owner_id: str
    submission_id: str
    label: str | None
    source_endpoint: str
    destination_endpoint: str
    items: list[dict[str, t.Any]]
    options: dict[str, t.Any]
    request_time: float
    deadline: str | None
    status: str = "ACTIVE"
    completion_time: float | None = None
    nice_status: str | None = "Queued"
    fatal_error: dict[str, t.Any] | None = None
    overrides: dict[str, t.Any] = dataclasses.field(default_factory=dict)

    def document(self) -> dict[str, t.Any]:
        """The Transfer task document (``GET /task/<id>``, ``task_list``)."""
        directories = sum(1 for item in self.items if item.get("recursive"))
        files = len(self.items) - directories
        total = len(self.items)
        succeeded = self.status == "SUCCEEDED"
        failed = self.status == "FAILED"
        finished = succeeded or failed

        doc: dict[str, t.Any] = {
            "DATA_TYPE": "task",
            "task_id": self.task_id,
            "type": "TRANSFER",
            "status": self.status,
            "label": self.label,
            "owner_id": self.owner_id,
            "username": legacy_username(self.owner_id),
            "request_time": iso_time(self.request_time),
            "completion_time": iso_time(self.completion_time),
            "deadline": self.deadline,
            "source_endpoint": _endpoint_display_name(self.source_endpoint),
            "source_endpoint_id": self.source_endpoint,
            "source_endpoint_display_name": _endpoint_display_name(
                self.source_endpoint
            ),
            "destination_endpoint": _endpoint_display_name(self.destination_endpoint),
            "destination_endpoint_id": self.destination_endpoint,
            "destination_endpoint_display_name": _endpoint_display_name(
                self.destination_endpoint
            ),
            "source_base_path": None,
            "destination_base_path": None,
            "command": "API 0.10",
            "files": files,
            "directories": directories,
            "symlinks": 0,
            "files_skipped": 0,
            "files_transferred": files if succeeded else 0,
            "bytes_transferred": 0,
            "bytes_checksummed": 0,
            "effective_bytes_per_second": 0,
            "subtasks_total": total,
            "subtasks_pending": 0 if finished else total,
            "subtasks_retrying": 0,
            "subtasks_succeeded": total if succeeded else 0,
            "subtasks_failed": total if failed else 0,
            "subtasks_canceled": 0,
            "subtasks_expired": 0,
            "subtasks_skipped_errors": 0,
            "faults": 0,
            "fatal_error": self.fatal_error,
            "nice_status": self.nice_status,
            "nice_status_details": None,
            "nice_status_expires_in": None if finished else -1,
            "nice_status_short_description": self.nice_status,
            "is_ok": None if finished else self.status == "ACTIVE",
            "is_paused": False,
            "canceled_by_admin": None,
            "canceled_by_admin_message": None,
            "history_deleted": False,
            "event_link": {
                "DATA_TYPE": "link",
                "href": f"task/{self.task_id}/event_list?format=json",
                "rel": "child",
                "resource": "event_list",
                "title": "child event_list",
            },
        }
        for name in _TASK_OPTION_DEFAULTS:
            if not name.startswith("notify_"):
                doc[name] = self.options.get(name, _TASK_OPTION_DEFAULTS[name])
        doc.update(self.overrides)
        return doc

    def control_view(self) -> dict[str, t.Any]:
        """What the control API shows: the document plus the raw submission."""
        view = self.document()
        view["submission_id"] = self.submission_id
        view["DATA"] = copy.deepcopy(self.items)
        view["submitted_options"] = copy.deepcopy(self.options)
        return view


def _endpoint_display_name(endpoint_id: str) -> str:
    return f"Stand-in collection {endpoint_id[:8]}"


@dataclasses.dataclass
class AccessRule:
    """One ACL rule on an endpoint."""

    id: str
    principal_type: str
    principal: str
    path: str
    permissions: str
    expiration_date: str | None
    create_time: float
    created_by: str

    def expires_at(self) -> float | None:
        if self.expiration_date is None:
            return None
        return parse_time(self.expiration_date)

    def document(self) -> dict[str, t.Any]:
        return {
            "DATA_TYPE": "access",
            "id": self.id,
            "principal_type": self.principal_type,
            "principal": self.principal,
            "path": self.path,
            "permissions": self.permissions,
            "expiration_date": self.expiration_date,
            "create_time": iso_time(self.create_time),
            "role_id": None,
            "role_type": None,
        }


@dataclasses.dataclass
class Fault:
    """An injected failure; see ``StandInState.add_fault``."""

    id: str
    operation: str
    status: int | None = None
    code: str | None = None
    message: str | None = None
    count: int | None = None
    probability: float | None = None
    hang: float | None = None
    drop: bool = False
    retry_after: int | None = None

    def matches(self, operation: str) -> bool:
        if self.operation in ("*", operation):
            return True
        if self.operation == "auth":
            return operation in AUTH_OPERATIONS
        if self.operation == "transfer":
            return operation in TRANSFER_OPERATIONS
        return False

    def to_dict(self) -> dict[str, t.Any]:
        return dataclasses.asdict(self)


class StandInState:
    """All state of one stand-in: Auth clients, identities and tokens,
    Transfer tasks and ACLs, plus injected faults and the call log.

    Create one per test (or per stand-in server) and hand it to
    ``make_app``; tests may also call its methods directly.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        default_expires_in: int = DEFAULT_EXPIRES_IN,
        acl_limit: int = DEFAULT_ACL_LIMIT,
        random_seed: int | None = None,
        clock: t.Callable[[], float] = time.time,
    ) -> None:
        self.lock = threading.RLock()
        self._clock = clock
        self._initial_settings = {
            "latency": latency,
            "default_expires_in": default_expires_in,
            "dependent_expires_in": None,
            "acl_limit": acl_limit,
        }
        self.rng = random.Random(random_seed)
        self.seed_clients: list[dict[str, t.Any]] = []

        # The public client that user tokens are "issued to" unless a test
        # says otherwise: it plays the Globus JupyterLab extension's client.
        self.native_client_id = str(uuid.uuid4())

        self.latency = latency
        self.default_expires_in = default_expires_in
        self.dependent_expires_in: int | None = None
        self.acl_limit = acl_limit
        self._clear()

    def _clear(self) -> None:
        self.clock_offset = 0.0
        self.clients: dict[str, RegisteredClient] = {}
        self.scopes: dict[str, ScopeDef] = {
            TRANSFER_SCOPE: ScopeDef(TRANSFER_SCOPE, TRANSFER_RESOURCE_SERVER)
        }
        self.identities: dict[str, Identity] = {}
        self.tokens: dict[str, Token] = {}
        self.refresh_tokens: dict[str, RefreshToken] = {}
        self.submission_ids: dict[str, str | None] = {}
        self.tasks: dict[str, Task] = {}
        self.acl_rules: dict[str, dict[str, AccessRule]] = {}
        self.access_managers: dict[str, set[str]] = {}
        self.faults: list[Fault] = []
        self.call_log: collections.deque[dict[str, t.Any]] = collections.deque(
            maxlen=MAX_CALL_RECORDS
        )

    # ------------------------------------------------------------------
    # settings, clock, reset
    # ------------------------------------------------------------------

    def now(self) -> float:
        """The stand-in's idea of the time; ``advance_clock`` moves it."""
        return self._clock() + self.clock_offset

    @_synchronized
    def advance_clock(self, seconds: float) -> float:
        """Jump forward so expiry can be tested without waiting."""
        self.clock_offset += float(seconds)
        return self.now()

    @_synchronized
    def settings(self) -> dict[str, t.Any]:
        return {
            "latency": self.latency,
            "default_expires_in": self.default_expires_in,
            "dependent_expires_in": self.dependent_expires_in,
            "acl_limit": self.acl_limit,
            "clock_offset": self.clock_offset,
            "native_client_id": self.native_client_id,
        }

    @_synchronized
    def configure(self, **changes: t.Any) -> dict[str, t.Any]:
        """Change ``latency``, token lifetimes or the ACL cap at run time."""
        for name, value in changes.items():
            if name == "latency":
                self.latency = _non_negative_float("latency", value)
            elif name == "default_expires_in":
                self.default_expires_in = _int_field("default_expires_in", value)
            elif name == "dependent_expires_in":
                self.dependent_expires_in = (
                    None if value is None else _int_field("dependent_expires_in", value)
                )
            elif name == "acl_limit":
                self.acl_limit = _int_field("acl_limit", value)
            else:
                raise ControlError(400, "BadSetting", f"unknown setting {name!r}")
        return self.settings()

    @_synchronized
    def reset(self) -> None:
        """Back to empty, except the clients given on the command line.

        Why keep those: a service under test was configured with their
        credentials before the stand-in started and cannot learn new ones.
        """
        self._clear()
        for name, value in self._initial_settings.items():
            setattr(self, name, value)

        for seed in self.seed_clients:
            self._create_client(**seed)

    @_synchronized
    def summary(self) -> dict[str, t.Any]:
        return {
            "clients": len(self.clients),
            "identities": len(self.identities),
            "tokens": len(self.tokens),
            "tasks": len(self.tasks),
            "acl_rules": sum(len(rules) for rules in self.acl_rules.values()),
            "faults": len(self.faults),
            "calls": len(self.call_log),
            "settings": self.settings(),
        }

    # ------------------------------------------------------------------
    # clients and identities
    # ------------------------------------------------------------------

    @_synchronized
    def add_seed_client(self, **options: t.Any) -> RegisteredClient:
        """Create a client that survives ``reset`` (see ``reset``)."""
        client = self._create_client(**options)
        seed = dict(options)
        seed["client_id"] = client.client_id
        seed["client_secret"] = client.client_secret
        self.seed_clients.append(seed)
        return client

    @_synchronized
    def create_client(
        self,
        client_id: str | None = None,
        client_secret: str | None = None,
        *,
        name: str | None = None,
        scope_suffix: str | None = DEFAULT_SCOPE_SUFFIX,
        dependent_scopes: list[str] | None = None,
        access_manager_of: t.Iterable[str] = (),
    ) -> RegisteredClient:
        """Register a confidential client and (unless ``scope_suffix`` is None)
        its custom scope, which by default depends on the Transfer scope."""
        return self._create_client(
            client_id=client_id,
            client_secret=client_secret,
            name=name,
            scope_suffix=scope_suffix,
            dependent_scopes=dependent_scopes,
            access_manager_of=access_manager_of,
        )

    def _create_client(
        self,
        client_id: str | None = None,
        client_secret: str | None = None,
        name: str | None = None,
        scope_suffix: str | None = DEFAULT_SCOPE_SUFFIX,
        dependent_scopes: list[str] | None = None,
        access_manager_of: t.Iterable[str] = (),
    ) -> RegisteredClient:
        if client_id is None:
            client_id = str(uuid.uuid4())
        elif canonical_uuid(client_id) is None:
            raise ControlError(400, "BadClientId", "client_id must be a UUID")
        client_id = str(uuid.UUID(client_id))
        if client_id in self.clients:
            raise ControlError(409, "ClientExists", f"client {client_id} exists")

        client = RegisteredClient(
            client_id=client_id,
            client_secret=client_secret or secrets.token_urlsafe(32),
            name=name or f"Stand-in client {client_id[:8]}",
        )
        self.clients[client_id] = client
        self.identities[client_id] = Identity(
            id=client_id,
            username=client.username,
            name=client.name,
            email=None,
            identity_provider=_provider_id(CLIENT_USERNAME_DOMAIN),
        )

        if scope_suffix:
            scope_string = f"{CUSTOM_SCOPE_PREFIX}{client_id}/{scope_suffix}"
            dependents = (
                [TRANSFER_SCOPE] if dependent_scopes is None else dependent_scopes
            )
            for dependent in dependents:
                self._ensure_scope(dependent)
            self.scopes[scope_string] = ScopeDef(
                scope_string=scope_string,
                resource_server=client_id,
                dependent_scopes=[base_scope(s) for s in dependents],
                owner_client_id=client_id,
            )
            client.scopes.append(scope_string)

        for endpoint_id in access_manager_of:
            self._add_access_manager(endpoint_id, client_id)

        log.info("stand-in client %s created, scopes %s", client_id, client.scopes)
        return client

    def _ensure_scope(self, scope: str) -> ScopeDef:
        """Look a scope up, registering well-formed unknown ones on the fly."""
        base = base_scope(scope)
        known = self.scopes.get(base)
        if known is not None:
            return known

        resource_server = resource_server_of(base)
        if resource_server is None:
            raise OAuthError(400, "invalid_scope", f"unknown scope {base!r}")
        definition = ScopeDef(base, resource_server)
        self.scopes[base] = definition
        return definition

    def authenticate_client(
        self, client_id: str | None, client_secret: str | None
    ) -> RegisteredClient:
        """Check HTTP Basic client credentials (constant-time secret compare)."""
        with self.lock:
            client = self.clients.get(canonical_uuid(client_id) or "")
        if client is None or client_secret is None:
            raise OAuthError(401, "invalid_client", "Invalid client credentials")
        if not secrets.compare_digest(client.client_secret, client_secret):
            raise OAuthError(401, "invalid_client", "Invalid client credentials")
        return client

    @_synchronized
    def create_identity(
        self,
        username: str,
        *,
        name: str | None = None,
        email: str | None = None,
        identity_id: str | None = None,
        organization: str | None = None,
    ) -> Identity:
        """Create a user identity; name and email default from the username."""
        if not isinstance(username, str) or not username:
            raise ControlError(400, "BadUsername", "username is required")
        if self._find_identity_by_username(username) is not None:
            raise ControlError(409, "IdentityExists", f"{username} exists")
        if identity_id is not None and canonical_uuid(identity_id) is None:
            raise ControlError(400, "BadIdentityId", "identity_id must be a UUID")

        local, _, domain = username.partition("@")
        identity = Identity(
            id=canonical_uuid(identity_id) or str(uuid.uuid4()),
            username=username,
            name=name or local.replace(".", " ").title(),
            email=email or (username if domain else None),
            identity_provider=_provider_id(domain or "example.org"),
            organization=organization,
        )
        self.identities[identity.id] = identity
        return identity

    def _find_identity_by_username(self, username: str) -> Identity | None:
        for identity in self.identities.values():
            if identity.username == username:
                return identity
        return None

    @_synchronized
    def find_identity(self, id_or_username: str) -> Identity:
        identity = self.identities.get(canonical_uuid(id_or_username) or "")
        if identity is None:
            identity = self._find_identity_by_username(id_or_username)
        if identity is None:
            raise ControlError(404, "IdentityNotFound", f"no identity {id_or_username}")
        return identity

    @_synchronized
    def set_consent_required(
        self,
        identity_id: str,
        value: bool = True,
        collections: t.Iterable[str] = (),
    ) -> Identity:
        """Make this identity's submissions fail with ``ConsentRequired``.

        With ``collections`` only submissions touching those collections fail,
        mimicking a missing ``data_access`` consent for specific collections.
        """
        identity = self.find_identity(identity_id)
        identity.consent_required = bool(value)
        identity.consent_collections = [
            _require_uuid("collections", c) for c in collections
        ]
        return identity

    @_synchronized
    def lookup_identities(
        self, ids: t.Iterable[str], usernames: t.Iterable[str]
    ) -> list[dict[str, t.Any]]:
        found: list[dict[str, t.Any]] = []
        for raw in ids:
            identity = self.identities.get(canonical_uuid(raw) or "")
            if identity is not None:
                found.append(identity.auth_document())
        for username in usernames:
            identity = self._find_identity_by_username(username)
            if identity is not None:
                found.append(identity.auth_document())
        return found

    # ------------------------------------------------------------------
    # tokens
    # ------------------------------------------------------------------

    def _issue(
        self,
        *,
        identity_id: str,
        issued_to: str,
        scopes: list[str],
        resource_server: str,
        grant: str,
        expires_in: int | None = None,
        refresh: bool = False,
        refresh_token: str | None = None,
    ) -> Token:
        now = self.now()
        lifetime = self.default_expires_in if expires_in is None else expires_in
        token = Token(
            access_token=new_secret_token(),
            identity_id=identity_id,
            issued_to=issued_to,
            scopes=list(scopes),
            resource_server=resource_server,
            issued_at=now,
            expires_at=now + lifetime,
            grant=grant,
            refresh_token=refresh_token,
        )
        if refresh and refresh_token is None:
            token.refresh_token = new_secret_token()
            self.refresh_tokens[token.refresh_token] = RefreshToken(
                value=token.refresh_token,
                identity_id=identity_id,
                issued_to=issued_to,
                scopes=list(scopes),
                resource_server=resource_server,
            )
        self.tokens[token.access_token] = token
        return token

    def _token_response(self, token: Token) -> dict[str, t.Any]:
        """One token object as the Auth token endpoint returns it."""
        response: dict[str, t.Any] = {
            "access_token": token.access_token,
            "scope": " ".join(token.scopes),
            "resource_server": token.resource_server,
            "expires_in": max(int(token.expires_at - self.now()), 0),
            "token_type": "Bearer",
        }
        if token.refresh_token is not None:
            response["refresh_token"] = token.refresh_token
        return response

    @_synchronized
    def issue_user_token(
        self,
        identity: str,
        *,
        scope: str | None = None,
        client_id: str | None = None,
        issued_to: str | None = None,
        expires_in: int | None = None,
        active: bool = True,
        refresh: bool = False,
    ) -> Token:
        """Issue the token a user's app would hold (e.g. for the hub's scope).

        ``scope`` defaults to the custom scope of ``client_id``; ``issued_to``
        defaults to ``native_client_id``, the stand-in for the JupyterLab
        extension's public client.
        """
        owner = self.find_identity(identity)
        if scope is None:
            if client_id is None:
                raise ControlError(400, "BadToken", "give a scope or a client_id")
            client = self.clients.get(canonical_uuid(client_id) or "")
            if client is None or not client.scopes:
                raise ControlError(404, "ClientNotFound", f"no scope of {client_id}")
            scope = client.scopes[0]

        requested = split_scopes(scope)
        if not requested:
            raise ControlError(400, "BadToken", "scope is empty")
        definitions = [self._control_scope(s) for s in requested]
        servers = {d.resource_server for d in definitions}
        if len(servers) != 1:
            raise ControlError(400, "BadToken", "scopes span several resource servers")
        owner_client = canonical_uuid(client_id) if client_id else None
        if owner_client and any(
            d.owner_client_id not in (None, owner_client) for d in definitions
        ):
            raise ControlError(
                400, "BadToken", f"scope {scope!r} is not a scope of {client_id}"
            )

        token = self._issue(
            identity_id=owner.id,
            issued_to=issued_to or self.native_client_id,
            scopes=[d.scope_string for d in definitions],
            resource_server=servers.pop(),
            grant="user",
            expires_in=expires_in,
            refresh=refresh,
        )
        token.active = bool(active)
        return token

    def _control_scope(self, scope: str) -> ScopeDef:
        try:
            return self._ensure_scope(scope)
        except OAuthError as err:
            raise ControlError(400, "BadScope", err.message) from err

    @_synchronized
    def update_token(
        self,
        value: str,
        *,
        expires_in: int | None = None,
        active: bool | None = None,
    ) -> Token:
        """Override one token's remaining lifetime or active flag."""
        token = self.tokens.get(value)
        if token is None:
            raise ControlError(404, "TokenNotFound", "no such access token")
        if expires_in is not None:
            token.expires_at = self.now() + int(expires_in)
        if active is not None:
            token.active = bool(active)
        return token

    @_synchronized
    def revoke_token(self, value: str) -> bool:
        """Revoke an access or refresh token; a refresh token takes the access
        tokens minted from it along, as Globus does."""
        token = self.tokens.get(value)
        if token is not None:
            token.active = False
            return True

        refresh = self.refresh_tokens.get(value)
        if refresh is None:
            return False
        refresh.active = False
        for access in self.tokens.values():
            if access.refresh_token == value:
                access.active = False
        return True

    @_synchronized
    def token_info(self, value: str) -> dict[str, t.Any]:
        token = self.tokens.get(value)
        if token is None:
            raise ControlError(404, "TokenNotFound", "no such access token")
        return token.to_dict(self.now())

    @_synchronized
    def introspect(
        self, caller: RegisteredClient, value: str, include: str | None = None
    ) -> dict[str, t.Any]:
        """Token introspection as Globus Auth answers it.

        A token the caller may not see (not in its audience) is reported
        inactive, exactly like an unknown one: real Auth hides it too.
        """
        token = self.tokens.get(value)
        if token is None or not token.is_valid(self.now()):
            return {"active": False}
        if caller.client_id not in token.audience:
            return {"active": False}

        identity = self.identities.get(token.identity_id)
        result: dict[str, t.Any] = {
            "active": True,
            "scope": " ".join(token.scopes),
            "client_id": token.issued_to,
            "sub": token.identity_id,
            "username": identity.username if identity else None,
            "name": identity.name if identity else None,
            "email": identity.email if identity else None,
            "exp": int(token.expires_at),
            "iat": int(token.issued_at),
            "nbf": int(token.issued_at),
            "aud": token.audience,
            "iss": AUTH_ISSUER,
            "token_type": "Bearer",
        }

        includes = {part.strip() for part in (include or "").split(",")}
        if "identity_set" in includes:
            result["identity_set"] = [token.identity_id]
        if "session_info" in includes:
            provider = identity.identity_provider if identity else None
            result["session_info"] = {
                "session_id": str(uuid.uuid5(uuid.NAMESPACE_URL, token.access_token)),
                "authentications": {
                    token.identity_id: {
                        "acr": None,
                        "amr": None,
                        "auth_time": int(token.issued_at),
                        "idp": provider,
                    }
                },
            }
        return result

    @_synchronized
    def client_credentials_grant(
        self, caller: RegisteredClient, scope: str | None
    ) -> dict[str, t.Any]:
        """Tokens for the client itself, one per resource server."""
        requested = split_scopes(scope or "")
        if not requested:
            raise OAuthError(400, "invalid_scope", "scope is required")

        grouped = self._group_by_resource_server(requested)
        tokens = [
            self._issue(
                identity_id=caller.identity_id,
                issued_to=caller.client_id,
                scopes=scopes,
                resource_server=server,
                grant="client_credentials",
            )
            for server, scopes in grouped.items()
        ]

        first = self._token_response(tokens[0])
        first["state"] = "_default"
        first["other_tokens"] = [self._token_response(tok) for tok in tokens[1:]]
        return first

    def _group_by_resource_server(self, scopes: list[str]) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for scope in scopes:
            definition = self._ensure_scope(scope)
            bucket = grouped.setdefault(definition.resource_server, [])
            if definition.scope_string not in bucket:
                bucket.append(definition.scope_string)
        return grouped

    @_synchronized
    def dependent_token_grant(
        self,
        caller: RegisteredClient,
        value: str | None,
        scope: str | None = None,
        offline: bool = False,
    ) -> list[dict[str, t.Any]]:
        """Exchange a token issued for the caller's scope for its dependents.

        The upstream token must be valid and carry a scope owned by the
        calling client; the new tokens belong to the same identity.
        """
        token = self.tokens.get(value or "")
        if token is None or not token.is_valid(self.now()):
            raise OAuthError(400, "invalid_grant", "Upstream token is not active")

        owned = [
            self.scopes[s]
            for s in token.scopes
            if s in self.scopes and self.scopes[s].owner_client_id == caller.client_id
        ]
        if not owned:
            raise OAuthError(
                400,
                "invalid_grant",
                "Upstream token was not issued for a scope of this client",
            )

        allowed: list[str] = []
        for definition in owned:
            for dependent in definition.dependent_scopes:
                if dependent not in allowed:
                    allowed.append(dependent)
        wanted = [base_scope(s) for s in split_scopes(scope)] if scope else allowed
        missing = [s for s in wanted if s not in allowed]
        if missing:
            raise OAuthError(
                400, "invalid_scope", f"Not a dependent scope: {' '.join(missing)}"
            )

        grouped = self._group_by_resource_server(wanted)
        tokens = [
            self._issue(
                identity_id=token.identity_id,
                issued_to=caller.client_id,
                scopes=scopes,
                resource_server=server,
                grant="dependent_token",
                expires_in=self.dependent_expires_in,
                refresh=offline,
            )
            for server, scopes in grouped.items()
        ]
        return [self._token_response(tok) for tok in tokens]

    @_synchronized
    def refresh_token_grant(
        self, caller: RegisteredClient, value: str | None
    ) -> dict[str, t.Any]:
        """A fresh access token for the same identity and scopes."""
        refresh = self.refresh_tokens.get(value or "")
        if refresh is None or not refresh.active:
            raise OAuthError(400, "invalid_grant", "Refresh token is not active")
        if refresh.issued_to != caller.client_id:
            raise OAuthError(
                400, "invalid_grant", "Refresh token was issued to another client"
            )

        expires_in = (
            self.dependent_expires_in
            if self.dependent_expires_in is not None
            else self.default_expires_in
        )
        token = self._issue(
            identity_id=refresh.identity_id,
            issued_to=refresh.issued_to,
            scopes=refresh.scopes,
            resource_server=refresh.resource_server,
            grant="refresh_token",
            expires_in=expires_in,
            refresh_token=refresh.value,
        )
        response = self._token_response(token)
        response["state"] = "_default"
        response["other_tokens"] = []
        return response

    @_synchronized
    def revoke_by_client(self, caller: RegisteredClient, value: str | None) -> None:
        """``/v2/oauth2/token/revoke``: only tokens the caller may see are
        revoked, and the answer never tells which (as RFC 7009 asks)."""
        token = self.tokens.get(value or "")
        if token is not None and caller.client_id in token.audience:
            token.active = False
            return

        refresh = self.refresh_tokens.get(value or "")
        if refresh is not None and refresh.issued_to == caller.client_id:
            self.revoke_token(refresh.value)

    @_synchronized
    def valid_token(self, value: str | None) -> Token | None:
        """The token if it is known, active and unexpired (any resource server)."""
        token = self.tokens.get(value or "")
        if token is None or not token.is_valid(self.now()):
            return None
        return token

    @_synchronized
    def transfer_caller(self, value: str | None) -> Token:
        """Resolve a Bearer token presented to Transfer, or raise 401."""
        if not value:
            raise TransferError(
                401, "AuthenticationFailed", "No Authorization header provided"
            )
        token = self.tokens.get(value)
        if token is None or not token.is_valid(self.now()):
            raise TransferError(401, "AuthenticationFailed", "Token is not active")
        if token.resource_server != TRANSFER_RESOURCE_SERVER:
            raise TransferError(
                401,
                "AuthenticationFailed",
                "Token is not valid for transfer.api.globus.org",
            )
        return token

    # ------------------------------------------------------------------
    # transfer tasks
    # ------------------------------------------------------------------

    @_synchronized
    def new_submission_id(self) -> str:
        submission_id = str(uuid.uuid4())
        self.submission_ids[submission_id] = None
        return submission_id

    @_synchronized
    def submit_transfer(
        self, identity_id: str, body: t.Any
    ) -> tuple[int, dict[str, t.Any]]:
        """Validate and accept a transfer document, idempotently.

        Returns the HTTP status and the ``transfer_result`` document (without
        ``request_id``/``resource``, which the HTTP layer adds).
        """
        if not isinstance(body, dict):
            raise _bad_request("Request body must be a JSON object")
        if body.get("DATA_TYPE") != "transfer":
            raise _bad_request("DATA_TYPE must be 'transfer'")

        submission_id = canonical_uuid(body.get("submission_id"))
        if submission_id is None:
            raise _bad_request("A valid submission_id is required")
        if submission_id not in self.submission_ids:
            raise _bad_request(f"Unknown submission_id '{submission_id}'")

        existing = self.submission_ids[submission_id]
        if existing is not None:
            if self.tasks[existing].owner_id != identity_id:
                raise _bad_request("submission_id was used by another identity")
            return 200, _transfer_result(
                "Duplicate",
                "A transfer with this submission_id was already accepted",
                submission_id,
                existing,
            )

        source, destination, items, options, label = _validate_transfer(body)
        self._check_consent(identity_id, source, destination)

        now = self.now()
        deadline = body.get("deadline")
        task = Task(
            task_id=str(uuid.uuid4()),
            owner_id=identity_id,
            submission_id=submission_id,
            label=label,
            source_endpoint=source,
            destination_endpoint=destination,
            items=items,
            options=options,
            request_time=now,
            deadline=(
                iso_time(parse_time(deadline))
                if isinstance(deadline, str)
                else iso_time(now + DEFAULT_DEADLINE_SECONDS)
            ),
        )
        self.tasks[task.task_id] = task
        self.submission_ids[submission_id] = task.task_id
        log.info("stand-in task %s accepted for %s", task.task_id, identity_id)
        return 202, _transfer_result(
            "Accepted",
            "The transfer has been accepted and a task has been created "
            "and queued for execution",
            submission_id,
            task.task_id,
        )

    def _check_consent(self, identity_id: str, source: str, destination: str) -> None:
        identity = self.identities.get(identity_id)
        if identity is None or not identity.consent_required:
            return

        touched = [source, destination]
        if identity.consent_collections:
            touched = [c for c in touched if c in identity.consent_collections]
            if not touched:
                return

        required = [
            f"{TRANSFER_SCOPE}[*{CUSTOM_SCOPE_PREFIX}{collection}/data_access]"
            for collection in dict.fromkeys(touched)
        ]
        message = "Missing required data_access consent"
        raise TransferError(
            403,
            "ConsentRequired",
            message,
            required_scopes=required,
            authorization_parameters={
                "session_message": message,
                "required_scopes": required,
            },
        )

    def _owned_task(self, identity_id: str, task_id: str) -> Task:
        task = self.tasks.get(canonical_uuid(task_id) or "")
        if task is None or task.owner_id != identity_id:
            raise TransferError(404, "TaskNotFound", f"Task ID {task_id} not found")
        return task

    @_synchronized
    def get_task(self, identity_id: str, task_id: str) -> dict[str, t.Any]:
        return self._owned_task(identity_id, task_id).document()

    @_synchronized
    def cancel_task(self, identity_id: str, task_id: str) -> dict[str, t.Any]:
        task = self._owned_task(identity_id, task_id)
        if task.status in ("SUCCEEDED", "FAILED"):
            raise TransferError(409, "TaskComplete", "The task already completed.")

        self._set_status(
            task,
            "FAILED",
            fatal_error={"code": "CANCELED", "description": "canceled"},
        )
        return {
            "DATA_TYPE": "result",
            "code": "Canceled",
            "message": "The task has been cancelled successfully.",
        }

    @_synchronized
    def task_list(
        self,
        identity_id: str,
        *,
        filters: list[str],
        limit: str | None,
        offset: str | None,
        orderby: str | None,
    ) -> dict[str, t.Any]:
        """The caller's own tasks, filtered, ordered and paged like Transfer."""
        page_limit = _query_int("limit", limit, DEFAULT_TASK_LIST_LIMIT)
        page_offset = _query_int("offset", offset, 0)
        if not 1 <= page_limit <= MAX_TASK_LIST_LIMIT:
            raise _bad_request(f"limit must be between 1 and {MAX_TASK_LIST_LIMIT}")

        keep = _task_filter(filters)
        docs = [
            task.document()
            for task in self.tasks.values()
            if task.owner_id == identity_id and keep(task)
        ]
        for field, descending in reversed(_orderby(orderby)):
            docs.sort(key=lambda doc: _sort_key(doc.get(field)), reverse=descending)

        page = docs[page_offset : page_offset + page_limit]
        return {
            "DATA_TYPE": "task_list",
            "DATA": page,
            "length": len(page),
            "limit": page_limit,
            "offset": page_offset,
            "total": len(docs),
        }

    @_synchronized
    def all_tasks(self) -> list[dict[str, t.Any]]:
        return [task.control_view() for task in self.tasks.values()]

    @_synchronized
    def set_task_status(
        self,
        task_id: str,
        status: str,
        *,
        nice_status: str | None = None,
        fatal_error: dict[str, t.Any] | None = None,
        fields: dict[str, t.Any] | None = None,
    ) -> dict[str, t.Any]:
        """Move a task along, as the real service would over time.

        ``fields`` overrides arbitrary task document fields (e.g. byte counts).
        """
        task = self.tasks.get(canonical_uuid(task_id) or "")
        if task is None:
            raise ControlError(404, "TaskNotFound", f"no task {task_id}")
        if status not in TASK_STATUSES:
            raise ControlError(
                400, "BadStatus", f"status must be one of {TASK_STATUSES}"
            )

        self._set_status(task, status, nice_status=nice_status, fatal_error=fatal_error)
        if fields:
            task.overrides.update(fields)
        return task.control_view()

    def _set_status(
        self,
        task: Task,
        status: str,
        *,
        nice_status: str | None = None,
        fatal_error: dict[str, t.Any] | None = None,
    ) -> None:
        task.status = status
        if status in ("SUCCEEDED", "FAILED"):
            task.completion_time = task.completion_time or self.now()
            task.nice_status = nice_status
        else:
            task.completion_time = None
            task.nice_status = nice_status or (
                "Queued" if status == "ACTIVE" else "PAUSED"
            )

        if status == "FAILED":
            task.fatal_error = fatal_error or {
                "code": "FAILED",
                "description": "failed by the stand-in control API",
            }
        else:
            task.fatal_error = None

    # ------------------------------------------------------------------
    # ACLs
    # ------------------------------------------------------------------

    def _add_access_manager(self, endpoint_id: str, identity_id: str) -> None:
        endpoint = _require_uuid("endpoint_id", endpoint_id)
        principal = _require_uuid("client_id", identity_id)
        self.access_managers.setdefault(endpoint, set()).add(principal)

    @_synchronized
    def add_access_manager(self, endpoint_id: str, identity_id: str) -> None:
        """Let a client (or identity) manage ``endpoint_id``'s ACL."""
        self._add_access_manager(endpoint_id, identity_id)

    def _managed_rules(
        self, identity_id: str, endpoint_id: str
    ) -> tuple[str, dict[str, AccessRule]]:
        endpoint = canonical_uuid(endpoint_id)
        if endpoint is None:
            raise TransferError(
                404, "EndpointNotFound", f"No such endpoint '{endpoint_id}'"
            )
        if identity_id not in self.access_managers.get(endpoint, set()):
            raise TransferError(
                403,
                "PermissionDenied",
                f"You do not have permission to manage access on '{endpoint}'",
            )
        return endpoint, self._live_rules(endpoint)

    def _live_rules(self, endpoint: str) -> dict[str, AccessRule]:
        """The endpoint's rules, dropping expired ones as Transfer does."""
        rules = self.acl_rules.setdefault(endpoint, {})
        now = self.now()
        for rule_id, rule in list(rules.items()):
            expires_at = rule.expires_at()
            if expires_at is not None and expires_at <= now:
                del rules[rule_id]
        return rules

    @_synchronized
    def acl_list(self, identity_id: str, endpoint_id: str) -> dict[str, t.Any]:
        endpoint, rules = self._managed_rules(identity_id, endpoint_id)
        data = [rule.document() for rule in rules.values()]
        return {
            "DATA_TYPE": "access_list",
            "endpoint": endpoint,
            "DATA": data,
            "length": len(data),
            "offset": 0,
            "limit": len(data),
            "total": len(data),
        }

    @_synchronized
    def acl_get(
        self, identity_id: str, endpoint_id: str, rule_id: str
    ) -> dict[str, t.Any]:
        _, rules = self._managed_rules(identity_id, endpoint_id)
        return _find_rule(rules, rule_id).document()

    @_synchronized
    def acl_add(
        self, identity_id: str, endpoint_id: str, body: t.Any
    ) -> dict[str, t.Any]:
        endpoint, rules = self._managed_rules(identity_id, endpoint_id)
        rule = self._new_rule(endpoint, rules, body, created_by=identity_id)
        return {
            "DATA_TYPE": "access_create_result",
            "code": "Created",
            "message": "Access rule created successfully.",
            "access_id": rule.id,
        }

    @_synchronized
    def acl_update(
        self, identity_id: str, endpoint_id: str, rule_id: str, body: t.Any
    ) -> dict[str, t.Any]:
        """Only ``permissions`` and ``expiration_date`` may change, as in Transfer."""
        _, rules = self._managed_rules(identity_id, endpoint_id)
        rule = _find_rule(rules, rule_id)
        if not isinstance(body, dict):
            raise _bad_request("Request body must be a JSON object")

        if "permissions" in body:
            rule.permissions = _acl_permissions(body["permissions"])
        if "expiration_date" in body:
            rule.expiration_date = _acl_expiration(body["expiration_date"])
        return {
            "DATA_TYPE": "result",
            "code": "Updated",
            "message": f"Access rule '{rule.id}' updated successfully",
        }

    @_synchronized
    def acl_delete(
        self, identity_id: str, endpoint_id: str, rule_id: str
    ) -> dict[str, t.Any]:
        _, rules = self._managed_rules(identity_id, endpoint_id)
        rule = _find_rule(rules, rule_id)
        del rules[rule.id]
        return {
            "DATA_TYPE": "result",
            "code": "Deleted",
            "message": f"Access rule '{rule.id}' deleted successfully",
        }

    @_synchronized
    def plant_acl_rule(self, endpoint_id: str, body: t.Any) -> dict[str, t.Any]:
        """Add a rule as if someone outside the service had made it.

        Skips the access-manager check, the ``Exists`` check and the cap, so a
        test can set up exactly the conflict it wants to exercise.
        """
        endpoint = _require_uuid("endpoint_id", endpoint_id)
        rules = self._live_rules(endpoint)
        rule = self._new_rule(
            endpoint, rules, body, created_by="stand-in-control", checks=False
        )
        return rule.document()

    @_synchronized
    def all_acl_rules(self, endpoint_id: str) -> list[dict[str, t.Any]]:
        endpoint = _require_uuid("endpoint_id", endpoint_id)
        return [rule.document() for rule in self._live_rules(endpoint).values()]

    def _new_rule(
        self,
        endpoint: str,
        rules: dict[str, AccessRule],
        body: t.Any,
        *,
        created_by: str,
        checks: bool = True,
    ) -> AccessRule:
        if not isinstance(body, dict):
            raise _bad_request("Request body must be a JSON object")
        if body.get("DATA_TYPE", "access") != "access":
            raise _bad_request("DATA_TYPE must be 'access'")

        principal_type = body.get("principal_type")
        if principal_type not in PRINCIPAL_TYPES:
            raise _bad_request(f"principal_type must be one of {PRINCIPAL_TYPES}")
        principal = body.get("principal") or ""
        if principal_type in ("identity", "group"):
            principal = canonical_uuid(principal) or ""
            if not principal:
                raise _bad_request(f"principal must be a {principal_type} id")
        elif principal:
            raise _bad_request(f"principal must be empty for {principal_type}")

        path = body.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise TransferError(400, "InvalidPath", "path must start with '/'")
        if not path.endswith("/"):
            raise TransferError(400, "InvalidPath", "path must end with '/'")

        permissions = _acl_permissions(body.get("permissions"))
        expiration = _acl_expiration(body.get("expiration_date"))

        if checks:
            for rule in rules.values():
                same = (rule.principal_type, rule.principal, rule.path)
                if same == (principal_type, principal, path):
                    raise TransferError(
                        409,
                        "Exists",
                        f"Access rule for {principal_type} '{principal}' on path "
                        f"'{path}' already exists",
                    )
            if len(rules) >= self.acl_limit:
                raise TransferError(
                    409,
                    "LimitExceeded",
                    f"Endpoint '{endpoint}' already has the maximum of "
                    f"{self.acl_limit} access rules",
                )

        rule = AccessRule(
            id=str(uuid.uuid4()),
            principal_type=principal_type,
            principal=principal,
            path=path,
            permissions=permissions,
            expiration_date=expiration,
            create_time=self.now(),
            created_by=created_by,
        )
        rules[rule.id] = rule
        return rule

    # ------------------------------------------------------------------
    # faults and the call log
    # ------------------------------------------------------------------

    @_synchronized
    def add_fault(
        self,
        operation: str = "*",
        *,
        status: int | None = None,
        code: str | None = None,
        message: str | None = None,
        count: int | None = None,
        probability: float | None = None,
        hang: float | None = None,
        drop: bool = False,
        retry_after: int | None = None,
    ) -> Fault:
        """Make matching calls fail: answer ``status`` (with ``code``), hang
        first for ``hang`` seconds, or ``drop`` the connection unanswered.

        ``count`` limits how many calls are hit; ``probability`` makes the
        fault random (seeded by ``random_seed``).  A hang without status or
        drop only delays the normal answer.
        """
        if operation not in FAULT_TARGETS:
            raise ControlError(400, "BadFault", f"unknown operation {operation!r}")
        if status is None and not drop and not hang:
            raise ControlError(400, "BadFault", "give status, hang or drop")
        if status is not None and not 400 <= int(status) <= 599:
            raise ControlError(400, "BadFault", "status must be 4xx or 5xx")
        if count is not None and int(count) < 1:
            raise ControlError(400, "BadFault", "count must be at least 1")
        if probability is not None and not 0.0 <= float(probability) <= 1.0:
            raise ControlError(400, "BadFault", "probability must be within 0..1")

        fault = Fault(
            id=str(uuid.uuid4()),
            operation=operation,
            status=None if status is None else int(status),
            code=code,
            message=message,
            count=None if count is None else int(count),
            probability=None if probability is None else float(probability),
            hang=None if hang is None else _non_negative_float("hang", hang),
            drop=bool(drop),
            retry_after=None if retry_after is None else int(retry_after),
        )
        self.faults.append(fault)
        return fault

    @_synchronized
    def clear_faults(self) -> None:
        self.faults.clear()

    @_synchronized
    def take_fault(self, operation: str) -> Fault | None:
        """The first fault hitting this call, consuming one of its ``count``."""
        for fault in list(self.faults):
            if not fault.matches(operation):
                continue
            if fault.probability is not None and self.rng.random() >= fault.probability:
                continue

            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self.faults.remove(fault)
            return dataclasses.replace(fault)
        return None

    @_synchronized
    def record_call(self, record: dict[str, t.Any]) -> None:
        """Append to the call log; callers must not put token values in it."""
        self.call_log.append(dict(record))

    @_synchronized
    def calls(self, operation: str | None = None) -> list[dict[str, t.Any]]:
        return [
            dict(call)
            for call in self.call_log
            if operation is None or call["operation"] == operation
        ]

    @_synchronized
    def clear_calls(self) -> None:
        self.call_log.clear()


def _provider_id(domain: str) -> str:
    """A stable identity-provider id per domain, so identities look coherent."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, domain))


def _bad_request(message: str) -> TransferError:
    return TransferError(400, "ClientError.BadRequest", message)


def _require_uuid(name: str, value: t.Any) -> str:
    canonical = canonical_uuid(value)
    if canonical is None:
        raise ControlError(400, "BadId", f"{name} must be a UUID, got {value!r}")
    return canonical


def _int_field(name: str, value: t.Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ControlError(400, "BadSetting", f"{name} must be a number")
    return int(value)


def _non_negative_float(name: str, value: t.Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ControlError(400, "BadSetting", f"{name} must be a number >= 0")
    return float(value)


def _query_int(name: str, raw: str | None, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad_request(f"{name} must be an integer") from None
    if value < 0:
        raise _bad_request(f"{name} must not be negative")
    return value


def _transfer_result(
    code: str, message: str, submission_id: str, task_id: str
) -> dict[str, t.Any]:
    return {
        "DATA_TYPE": "transfer_result",
        "code": code,
        "message": message,
        "submission_id": submission_id,
        "task_id": task_id,
        "task_link": {
            "DATA_TYPE": "link",
            "href": f"task/{task_id}?format=json",
            "rel": "related",
            "resource": "task",
            "title": "related task",
        },
    }


def _validate_transfer(
    body: dict[str, t.Any],
) -> tuple[str, str, list[dict[str, t.Any]], dict[str, t.Any], str | None]:
    """Check a transfer document the way Transfer does, field by field."""
    source = canonical_uuid(body.get("source_endpoint"))
    destination = canonical_uuid(body.get("destination_endpoint"))
    if source is None:
        raise _bad_request("source_endpoint must be a collection id")
    if destination is None:
        raise _bad_request("destination_endpoint must be a collection id")

    label = body.get("label")
    if label is not None:
        if not isinstance(label, str) or len(label) > MAX_LABEL_LENGTH:
            raise _bad_request(f"label must be a string of <= {MAX_LABEL_LENGTH}")
        if label != label.strip() or "\n" in label or "\r" in label:
            raise _bad_request("label must not have newlines or outer whitespace")

    items = body.get("DATA")
    if not isinstance(items, list) or not items:
        raise _bad_request("A transfer requires at least one item")
    for index, item in enumerate(items):
        _validate_transfer_item(index, item)

    options: dict[str, t.Any] = {}
    for name in _TASK_OPTION_DEFAULTS:
        if name in body:
            options[name] = copy.deepcopy(body[name])
    for name in _BOOLEAN_OPTIONS:
        if name in options and not isinstance(options[name], bool):
            raise _bad_request(f"{name} must be a boolean")
    sync_level = options.get("sync_level")
    if sync_level is not None and sync_level not in (0, 1, 2, 3):
        raise _bad_request("sync_level must be 0, 1, 2 or 3")

    deadline = body.get("deadline")
    if deadline is not None:
        try:
            parse_time(deadline)
        except (TypeError, ValueError, AttributeError):
            raise _bad_request("deadline must be an ISO 8601 time") from None

    return source, destination, copy.deepcopy(items), options, label


def _validate_transfer_item(index: int, item: t.Any) -> None:
    if not isinstance(item, dict):
        raise _bad_request(f"DATA[{index}] must be an object")
    if item.get("DATA_TYPE") != "transfer_item":
        raise _bad_request(f"DATA[{index}].DATA_TYPE must be 'transfer_item'")
    for field in ("source_path", "destination_path"):
        value = item.get(field)
        if not isinstance(value, str) or not value:
            raise _bad_request(f"DATA[{index}].{field} is required")
    recursive = item.get("recursive")
    if recursive is not None and not isinstance(recursive, bool):
        raise _bad_request(f"DATA[{index}].recursive must be a boolean")


_FILTER_FIELDS = (
    "task_id",
    "status",
    "type",
    "label",
    "request_time",
    "completion_time",
)
_ORDER_FIELDS = (
    "request_time",
    "completion_time",
    "label",
    "status",
    "task_id",
    "type",
)


def _task_filter(filters: list[str]) -> t.Callable[[Task], bool]:
    """Compile Transfer's ``key:v1,v2/key2:...`` filter syntax to a predicate."""
    checks: list[t.Callable[[Task], bool]] = []
    for raw in filters:
        for clause in raw.split("/"):
            if not clause:
                continue
            key, sep, value = clause.partition(":")
            if not sep or key not in _FILTER_FIELDS:
                raise _bad_request(f"Invalid filter clause '{clause}'")
            checks.append(_filter_clause(key, value))
    return lambda task: all(check(task) for check in checks)


def _filter_clause(key: str, value: str) -> t.Callable[[Task], bool]:
    if key in ("request_time", "completion_time"):
        return _time_range_clause(key, value)
    if key == "label":
        wanted_label = value.lower()
        return lambda task: wanted_label in (task.label or "").lower()

    wanted = {part.strip() for part in value.split(",") if part.strip()}
    if key == "task_id":
        wanted = {canonical_uuid(part) or part for part in wanted}
        return lambda task: task.task_id in wanted
    if key == "status":
        return lambda task: task.status in {w.upper() for w in wanted}
    return lambda task: "TRANSFER" in {w.upper() for w in wanted}


def _time_range_clause(key: str, value: str) -> t.Callable[[Task], bool]:
    start_raw, _, end_raw = value.partition(",")
    try:
        start = parse_time(start_raw) if start_raw.strip() else None
        end = parse_time(end_raw) if end_raw.strip() else None
    except ValueError:
        raise _bad_request(f"Invalid {key} filter '{value}'") from None

    def check(task: Task) -> bool:
        moment = task.request_time if key == "request_time" else task.completion_time
        if moment is None:
            return False
        return (start is None or moment >= start) and (end is None or moment <= end)

    return check


def _orderby(raw: str | None) -> list[tuple[str, bool]]:
    if not raw:
        return [("request_time", True)]
    order: list[tuple[str, bool]] = []
    for part in raw.split(","):
        words = part.split()
        if not words or words[0] not in _ORDER_FIELDS or len(words) > 2:
            raise _bad_request(f"Invalid orderby '{part.strip()}'")
        direction = words[1].upper() if len(words) == 2 else "ASC"
        if direction not in ("ASC", "DESC"):
            raise _bad_request(f"Invalid orderby '{part.strip()}'")
        order.append((words[0], direction == "DESC"))
    return order


def _sort_key(value: t.Any) -> tuple[int, str]:
    """Sort None first and everything else as text (ISO times sort as text)."""
    return (0, "") if value is None else (1, str(value))


def _find_rule(rules: dict[str, AccessRule], rule_id: str) -> AccessRule:
    rule = rules.get(rule_id)
    if rule is None:
        raise TransferError(
            404, "AccessRuleNotFound", f"Access rule '{rule_id}' not found"
        )
    return rule


def _acl_permissions(value: t.Any) -> str:
    if value not in ACL_PERMISSIONS:
        raise _bad_request("permissions must be 'r' or 'rw'")
    return t.cast(str, value)


def _acl_expiration(value: t.Any) -> str | None:
    if value is None:
        return None
    try:
        return iso_time(parse_time(value))
    except (TypeError, ValueError, AttributeError):
        raise _bad_request("expiration_date must be an ISO 8601 time") from None
