"""TransferSubmitter: the one object that holds our Globus credentials.

It checks a user's Globus token (introspection with our confidential client),
exchanges it for a Transfer token (the dependent-token grant) and submits a
transfer as the user. globus-sdk is synchronous, so every call runs in a bounded
thread pool owned by the submitter; handlers only ever ``await`` it.

Results that are costly to fetch and safe to reuse are cached per token hash:
introspection for a short while, dependent tokens until shortly before they
expire. A warm submission therefore costs Globus two calls: a submission id and
the submit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
import typing as t

import globus_sdk
import requests.adapters
from globus_sdk.transport import RequestsTransport, RetryConfig
from traitlets import Bool, Float, Integer, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from ..errors import ServiceError
from ..log import token_hash
from ..metrics import Metrics
from ..model import GlobusUser, TransferDocument
from .cache import ExpiringLRU
from .errors import from_globus_error

T = t.TypeVar("T")

TRANSFER_RESOURCE_SERVER = "transfer.api.globus.org"
TRANSFER_SCOPE = "urn:globus:auth:scope:transfer.api.globus.org:all"
# task ids per task_list call when polling; keeps the filter well inside URL limits
TASK_BATCH = 100


@dataclasses.dataclass(frozen=True)
class UserCredential:
    """A user's Transfer token from the dependent grant (never logged)."""

    access_token: str = dataclasses.field(repr=False)
    refresh_token: str | None = dataclasses.field(repr=False)
    expires_at: float


class TransferSubmitter(LoggingConfigurable):
    """Check users' Globus tokens and submit transfers on their behalf."""

    client_id = Unicode(
        help="""Client id of the Globus confidential client that owns the custom
        scope. Introspection and the dependent-token grant are made with it.

        Default: the GLOBUS_CLIENT_ID environment variable.
        """
    ).tag(config=True)

    @default("client_id")
    def _client_id_from_env(self) -> str:
        return os.environ.get("GLOBUS_CLIENT_ID", "")

    client_secret = Unicode(
        help="""Secret of the Globus confidential client. Never logged.

        Default: the GLOBUS_CLIENT_SECRET environment variable.
        """
    ).tag(config=True)

    @default("client_secret")
    def _client_secret_from_env(self) -> str:
        return os.environ.get("GLOBUS_CLIENT_SECRET", "")

    required_scope = Unicode(
        help="""The custom Globus scope users' tokens must carry: the same string the
        JupyterLab extension is given as GLOBUS_TRANSFER_SUBMISSION_SCOPE. The
        scope must list Transfer's scope among its dependent scopes.

        Default: the GLOBUS_TRANSFER_SUBMISSION_SCOPE environment variable.
        """
    ).tag(config=True)

    @default("required_scope")
    def _required_scope_from_env(self) -> str:
        return os.environ.get("GLOBUS_TRANSFER_SUBMISSION_SCOPE", "")

    @validate("client_id", "client_secret", "required_scope")
    def _strip(self, proposal: t.Any) -> str:
        # values pasted into Helm charts or .env files often end in a newline
        return proposal["value"].strip()

    max_items = Integer(
        1000,
        help="The most DATA items one submission may carry; more is a 400.",
    ).tag(config=True)

    max_workers = Integer(
        32,
        help="""Threads that run Globus calls. A slow Globus ties up one thread per
        in-flight call; this bounds how many users can wait on Globus at once,
        and throughput: about max_workers / (2 x Globus call time) submissions
        per second on the warm path.
        """,
    ).tag(config=True)

    http_timeout = Float(
        10.0,
        help="Seconds one HTTP call to Globus may take before it is abandoned.",
    ).tag(config=True)

    max_retries = Integer(
        1,
        help="""Retries of a Globus call that failed transiently (5xx, 429,
        connection reset). A submit is retried with the same submission id, so
        Globus never starts it twice.
        """,
    ).tag(config=True)

    ambiguous_retries = Integer(
        2,
        help="""Times a submit that timed out or lost its connection is repeated,
        with the same submission id, to learn whether Globus started it. Runs on
        after the request's deadline, so the task is tracked either way.
        """,
    ).tag(config=True)

    introspection_ttl = Float(
        30.0,
        help="""Seconds a token introspection result is reused, never past the
        token's own expiry. Failed introspections are remembered as long.
        """,
    ).tag(config=True)

    dependent_token_margin = Float(
        120.0,
        help="""A cached Transfer token is dropped this many seconds before it
        expires, so it never expires in the middle of a submission.
        """,
    ).tag(config=True)

    keep_refresh_tokens = Bool(
        False,
        help="""Also ask for refresh tokens in the dependent-token grant. Turned
        on by the application in ACL mode, where users' tasks are polled long
        after their access tokens expire.
        """,
    ).tag(config=True)

    cache_size = Integer(
        10000,
        help="Entries kept at most in each token cache (least recently used go).",
    ).tag(config=True)

    def __init__(
        self,
        *,
        auth_client: globus_sdk.ConfidentialAppAuthClient | None = None,
        **kwargs: t.Any,
    ) -> None:
        super().__init__(**kwargs)
        self._auth_client = auth_client
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_workers, thread_name_prefix="globus"
        )
        self.introspections: ExpiringLRU[str, GlobusUser | ServiceError] = ExpiringLRU(
            self.cache_size
        )
        self.transfer_tokens: ExpiringLRU[str, UserCredential] = ExpiringLRU(
            self.cache_size
        )
        self.polling_tokens: ExpiringLRU[str, str] = ExpiringLRU(self.cache_size)
        self._service_client: globus_sdk.TransferClient | None = None
        self._service_client_lock = threading.Lock()
        self.metrics: Metrics | None = None
        self.in_flight = 0
        self._transport = self._make_transport()

    # ------------------------------------------------------------------
    # life cycle

    def missing_settings(self) -> list[str]:
        """Names of the settings that must be set before the service can run."""
        return [
            f"TransferSubmitter.{name} ({env})"
            for name, env in (
                ("client_id", "GLOBUS_CLIENT_ID"),
                ("client_secret", "GLOBUS_CLIENT_SECRET"),
                ("required_scope", "GLOBUS_TRANSFER_SUBMISSION_SCOPE"),
            )
            if not getattr(self, name)
        ]

    def close(self) -> None:
        """Stop the thread pool (letting running calls end) and drop sessions."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._transport.close()

    def _make_transport(self) -> RequestsTransport:
        """One HTTP session for every Globus call, so connections are reused.

        requests' pool keeps ten connections per host by default; with more
        worker threads than that, the extra calls would open and throw away a
        connection each time.
        """
        transport = RequestsTransport(http_timeout=self.http_timeout)
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=4, pool_maxsize=max(self.max_workers, 10)
        )
        transport.session.mount("https://", adapter)
        transport.session.mount("http://", adapter)
        return transport

    def _retry_config(self) -> RetryConfig:
        # a fresh config per client: globus-sdk registers its checks on it
        return RetryConfig(max_retries=self.max_retries, max_sleep=2)

    @property
    def auth_client(self) -> globus_sdk.ConfidentialAppAuthClient:
        if self._auth_client is None:
            self._auth_client = globus_sdk.ConfidentialAppAuthClient(
                self.client_id,
                self.client_secret,
                transport=self._transport,
                retry_config=self._retry_config(),
            )
        return self._auth_client

    def transfer_client(self, access_token: str) -> globus_sdk.TransferClient:
        """A Transfer client acting with ``access_token``, on the shared session."""
        return globus_sdk.TransferClient(
            authorizer=globus_sdk.AccessTokenAuthorizer(access_token),
            transport=self._transport,
            retry_config=self._retry_config(),
        )

    async def call(
        self, operation: str, fn: t.Callable[..., T], *args: t.Any, **kwargs: t.Any
    ) -> T:
        """Run a blocking globus-sdk call in the pool and map its failures.

        :param operation: short name used in error messages and logs
        :raises ServiceError: for every Globus or network failure
        """
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        outcome = "ok"
        self.in_flight += 1
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs)
            )
        except globus_sdk.GlobusError as exc:
            error = from_globus_error(exc, operation)
            outcome = error.details.get("globus_code") or error.error
            raise error from None
        except ServiceError as exc:
            outcome = exc.error
            raise
        finally:
            self.in_flight -= 1
            if self.metrics is not None:
                self.metrics.observe_call(
                    operation, str(outcome), time.perf_counter() - started
                )

    @property
    def queue_depth(self) -> int:
        """Globus calls waiting for a free worker thread."""
        return max(0, self.in_flight - self.max_workers)

    def caches(self) -> dict[str, ExpiringLRU[t.Any, t.Any]]:
        return {
            "introspection": self.introspections,
            "transfer_token": self.transfer_tokens,
            "polling_token": self.polling_tokens,
        }

    # ------------------------------------------------------------------
    # the user's Globus token

    async def authenticate(self, token: str) -> GlobusUser:
        """Introspect the user's token and check it may be used with us.

        :raises ServiceError: 401 with ``globus_token_inactive``,
            ``globus_token_expired`` or ``globus_token_scope``
        """
        key = token_hash(token)

        async def introspect() -> tuple[GlobusUser | ServiceError, float]:
            response = await self.call(
                "introspect",
                self.auth_client.oauth2_token_introspect,
                token,
                include="identity_set",
            )
            return self._judge_introspection(response.data, key)

        outcome = await self.introspections.get_or_load(key, introspect)
        if isinstance(outcome, ServiceError):
            raise outcome
        if outcome.expires_at <= time.time():
            raise _expired()
        return outcome

    def _judge_introspection(
        self, data: dict[str, t.Any], key: str
    ) -> tuple[GlobusUser | ServiceError, float]:
        """Decide what an introspection means and how long to believe it."""
        if not data.get("active"):
            return (
                ServiceError(
                    401,
                    "globus_token_inactive",
                    "The Globus token is not active (revoked, unknown, or issued "
                    "for another service). Log in to Globus again from JupyterLab.",
                ),
                self.introspection_ttl,
            )

        expires_at = float(data.get("exp") or 0)
        remaining = expires_at - time.time()
        if remaining <= 0:
            return _expired(), self.introspection_ttl

        scopes = frozenset(str(data.get("scope") or "").split())
        if self.required_scope not in scopes:
            return (
                ServiceError(
                    401,
                    "globus_token_scope",
                    "The Globus token was not issued for this service's scope. "
                    "Check that GLOBUS_TRANSFER_SUBMISSION_SCOPE in the user's "
                    "server matches the service's scope.",
                ),
                self.introspection_ttl,
            )

        identity_id = str(data.get("sub") or "")
        user = GlobusUser(
            identity_id=identity_id,
            username=str(data.get("username") or ""),
            identity_set=tuple(data.get("identity_set") or (identity_id,)),
            scopes=scopes,
            expires_at=expires_at,
            token_hash=key,
        )
        return user, min(self.introspection_ttl, remaining)

    # ------------------------------------------------------------------
    # acting as the user

    async def user_credential(self, token: str, user: GlobusUser) -> UserCredential:
        """A Transfer token for the user, via the dependent-token grant.

        The token is picked by resource server, never by list position: a scope
        with several dependencies returns tokens in no promised order. With
        ``keep_refresh_tokens`` the grant also asks for a refresh token, so the
        user's tasks can still be polled after the access token expires.
        """

        async def grant() -> tuple[UserCredential, float]:
            response = await self.call(
                "dependent_token",
                self.auth_client.oauth2_get_dependent_tokens,
                token,
                scope=TRANSFER_SCOPE,
                refresh_tokens=self.keep_refresh_tokens,
            )
            info = response.by_resource_server.get(TRANSFER_RESOURCE_SERVER)
            if not info:
                raise ServiceError(
                    502,
                    "no_transfer_token",
                    "Globus Auth gave no Transfer token for the user's token: the "
                    "custom scope must list Transfer's scope "
                    f"({TRANSFER_SCOPE}) among its dependent scopes.",
                )
            credential = UserCredential(
                access_token=info["access_token"],
                refresh_token=info.get("refresh_token"),
                expires_at=float(info["expires_at_seconds"]),
            )
            ttl = credential.expires_at - time.time() - self.dependent_token_margin
            return credential, ttl

        return await self.transfer_tokens.get_or_load(user.token_hash, grant)

    async def submit(
        self, credential: UserCredential, user: GlobusUser, document: TransferDocument
    ) -> dict[str, t.Any]:
        """Submit ``document`` to Globus Transfer as the user.

        :returns: Globus's answer: ``task_id``, ``submission_id``, ``code``...
        :raises ServiceError: if Globus refuses or cannot be reached
        """
        # TODO: the two warm-path calls below cost ~1.5 ms of CPU each in
        # requests/urllib3 on a worker thread, and the pool caps throughput at
        # about max_workers / (2 x call time). Making them on the event loop
        # with a keep-alive async HTTP client halved CPU per submission in the
        # benchmark's prototype (benchmarks/prototypes.py); it needs a client
        # both supported JupyterHub versions ship, and the same timeout, retry
        # and error mapping as globus-sdk gives here.
        client = self.transfer_client(credential.access_token)
        try:
            # a submission id first, so a retried submit can never start twice
            submission = await self.call("submission_id", client.get_submission_id)
            data = build_transfer_data(document, submission["value"])
            result = await self.submit_until_known(client, data)
        except ServiceError as err:
            # a token Globus no longer accepts must not be served again
            if err.status_code in (401, 403):
                self.transfer_tokens.discard(user.token_hash)
            raise
        return dict(result.data)

    async def submit_until_known(
        self, client: globus_sdk.TransferClient, data: globus_sdk.TransferData
    ) -> t.Any:
        """Submit, and after a timeout or a lost connection submit again.

        Such a failure leaves it unknown whether Globus started the transfer.
        The same submission id makes a repeat safe: Globus answers with the
        task it already has, or starts it now. Only a known outcome is
        returned; the caller may have stopped waiting, but the service still
        learns the task id and tracks (or revokes) accordingly.
        """
        for attempt in range(self.ambiguous_retries + 1):
            try:
                return await self.call("submit", client.submit_transfer, data)
            except ServiceError as err:
                unknown = err.error in ("globus_timeout", "globus_unreachable")
                if not unknown or attempt == self.ambiguous_retries:
                    raise
                self.log.warning(
                    "Submit of %s ended without an answer (%s); submitting again",
                    data["submission_id"],
                    err.error,
                )
                await asyncio.sleep(2**attempt)
        raise AssertionError("unreachable")

    async def task_statuses(
        self, identity_id: str, refresh_token: str, task_ids: list[str]
    ) -> dict[str, str]:
        """The status of each of one user's tasks, in as few calls as possible.

        Uses the user's kept refresh token, since the access token of the
        original request has long expired by the time a transfer ends. One
        ``task_list`` call covers up to ``TASK_BATCH`` tasks.
        """

        async def refresh() -> tuple[str, float]:
            response = await self.call(
                "refresh_token", self.auth_client.oauth2_refresh_token, refresh_token
            )
            info = response.by_resource_server.get(TRANSFER_RESOURCE_SERVER) or {}
            if not info.get("access_token"):
                raise ServiceError(
                    502,
                    "no_transfer_token",
                    "The refresh grant gave no Transfer token.",
                )
            ttl = float(info["expires_at_seconds"]) - time.time()
            return info["access_token"], ttl - self.dependent_token_margin

        access_token = await self.polling_tokens.get_or_load(identity_id, refresh)
        client = self.transfer_client(access_token)

        statuses: dict[str, str] = {}
        for start in range(0, len(task_ids), TASK_BATCH):
            batch = task_ids[start : start + TASK_BATCH]
            try:
                page = await self.call(
                    "task_list",
                    client.task_list,
                    filter="task_id:" + ",".join(batch),
                    limit=len(batch),
                )
            except ServiceError as err:
                if err.status_code in (401, 403):
                    self.polling_tokens.discard(identity_id)
                raise
            for task in page:
                statuses[task["task_id"]] = task["status"]
        return statuses

    def forget_refresh_token(self, refresh_token: str) -> None:
        """Drop cached Transfer tokens that came with ``refresh_token``.

        Called before the refresh token is revoked: Globus ends the access
        tokens of a revoked grant, and a cached one would then fail the user's
        next submission.
        """
        self.transfer_tokens.discard_where(
            lambda credential: credential.refresh_token == refresh_token
        )
        self.polling_tokens.clear()

    async def revoke_token(self, token: str) -> None:
        """Revoke a token we hold (a retired refresh token) at Globus Auth."""
        await self.call("revoke", self.auth_client.oauth2_revoke_token, token)

    # ------------------------------------------------------------------
    # acting as the service itself

    def service_transfer_client(self) -> globus_sdk.TransferClient:
        """A Transfer client with the service's own client-credentials token.

        The authorizer fetches the token once and renews it shortly before it
        expires, so ACL calls do not each cost a token request. Creating it
        fetches the first token, so call this from the pool, never the loop.
        """
        with self._service_client_lock:
            return self._make_service_client()

    def _make_service_client(self) -> globus_sdk.TransferClient:
        if self._service_client is None:
            authorizer = globus_sdk.ClientCredentialsAuthorizer(
                self.auth_client, TRANSFER_SCOPE
            )
            self._service_client = globus_sdk.TransferClient(
                authorizer=authorizer,
                transport=self._transport,
                retry_config=self._retry_config(),
            )
        return self._service_client


def build_transfer_data(
    document: TransferDocument, submission_id: str
) -> globus_sdk.TransferData:
    """The globus-sdk v4 payload for a checked transfer document."""
    data = globus_sdk.TransferData(
        source_endpoint=document.source_endpoint,
        destination_endpoint=document.destination_endpoint,
        label=globus_sdk.MISSING if document.label is None else document.label,
        submission_id=submission_id,
    )
    for item in document.items:
        data.add_item(item.source_path, item.destination_path, recursive=item.recursive)
    return data


def _expired() -> ServiceError:
    return ServiceError(
        401,
        "globus_token_expired",
        "The Globus token has expired. Log in to Globus again from JupyterLab.",
    )
