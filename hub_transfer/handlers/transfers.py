"""POST a transfer: the JupyterLab extension's one call to us.

The handler reads like the path of a submission: who is calling, is the body
sound, whose Globus token is it, submit as the user, answer with the task id.
"""

from __future__ import annotations

import asyncio
import logging
import typing as t

from tornado import web
from tornado.http1connection import HTTP1Connection

from ..access import AccessManager, Hold
from ..errors import ServiceError
from ..globus import GlobusUser, TransferSubmitter, UserCredential
from ..limits import UserLimits
from ..model import DocumentError, SubmitRequest, parse_submit_body
from ..policy import AccessNeed, AccessPolicy, IdentityBinding, PolicyError
from .base import APIHandler

log = logging.getLogger(__name__)
T = t.TypeVar("T")

# a refused body is read and discarded up to this many times max_body_size, so
# the caller (through the proxy) gets our JSON answer, not a reset connection
DRAIN_FACTOR = 16


@web.stream_request_body
class TransfersHandler(APIHandler):
    """Submit a transfer for the calling hub user.

    The body is streamed so the hub identity is checked, and an oversized body
    refused with a JSON 413, before a single byte of it is buffered. Tornado's
    own size limit would instead drop the connection, which the proxy turns into
    an HTML 503.
    """

    def initialize(  # type: ignore[override]
        self,
        hub_auth: t.Any,
        submitter: TransferSubmitter,
        max_body_size: int,
        access: AccessManager | None = None,
        policy: AccessPolicy | None = None,
        test_pause: tuple[str, float] | None = None,
        *,
        limits: UserLimits,
        binding: IdentityBinding,
        request_timeout: float,
        **kwargs: t.Any,
    ) -> None:
        super().initialize(hub_auth, **kwargs)
        self.submitter = submitter
        self.max_body_size = max_body_size
        self.access = access
        self.policy = policy
        self.test_pause = test_pause
        self.limits = limits
        self.binding = binding
        self.request_timeout = request_timeout
        self._work: asyncio.Future[t.Any] | None = None
        self._submitting = False
        self._caller_gone = False
        self._stopping = False
        self._chunks: list[bytes] = []
        self._received = 0
        self._early_error: ServiceError | None = None

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "POST":
            return

        # Answering before the body is read makes tornado close the connection
        # on a client still sending; the proxy then shows the user an HTML 503.
        # So a refusal waits until the body has been read (and thrown away),
        # up to a bound beyond which closing is the lesser evil.
        drain_limit = DRAIN_FACTOR * self.max_body_size
        declared = self.request.headers.get("Content-Length", "")
        too_big_to_drain = declared.isdigit() and int(declared) > drain_limit
        try:
            self.check_before_body(declared)
        except ServiceError as exc:
            if too_big_to_drain:
                raise
            self._early_error = exc
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            connection.set_max_body_size(drain_limit)

    def check_before_body(self, declared: str) -> None:
        """Refusals that need no body: strangers, wrong types, declared size."""
        self.require_hub_user_not_service()
        content_type = self.request.headers.get("Content-Type", "application/json")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise ServiceError(
                415,
                "unsupported_media_type",
                "Send the transfer document as application/json.",
            )
        if declared.isdigit() and int(declared) > self.max_body_size:
            raise self._too_large()

    def data_received(self, chunk: bytes) -> None:
        # past the limit, or when already refused, keep reading but not keeping
        self._received += len(chunk)
        if self._early_error is None and self._received <= self.max_body_size:
            self._chunks.append(chunk)

    def _too_large(self) -> ServiceError:
        return ServiceError(
            413,
            "body_too_large",
            f"The request body is larger than {self.max_body_size} bytes.",
        )

    def parse_body(self) -> SubmitRequest:
        if self._early_error is not None:
            raise self._early_error
        if self._received > self.max_body_size:
            raise self._too_large()
        try:
            return parse_submit_body(
                b"".join(self._chunks), max_items=self.submitter.max_items
            )
        except DocumentError as exc:
            raise ServiceError(
                400, "invalid_transfer", exc.message, field=exc.field
            ) from None

    def plan_access(self, request: SubmitRequest, username: str) -> list[AccessNeed]:
        """The rules this transfer needs on the hub collection; none off ACL mode."""
        access, policy = self.access, self.policy
        if access is None or policy is None:
            return []
        return self.check(
            lambda: policy.needs(request.transfer, access.collection_id, username)
        )

    @staticmethod
    def check(decide: t.Callable[[], T]) -> T:
        """Run a policy decision, turning a refusal into the JSON error."""
        try:
            return decide()
        except PolicyError as exc:
            raise ServiceError(
                exc.status, exc.error, exc.message, field=exc.field or None
            ) from None

    async def pause_for_tests(self, label: str | None) -> None:
        """Hold a submission between its rules and its submit, for crash tests.

        Active only when HUB_TRANSFER_TEST_PAUSE_LABEL is set and the transfer
        carries that label; a real deployment never sets it.
        """
        if self.test_pause and label == self.test_pause[0]:
            log.warning("Test pause: holding %r for %ss", label, self.test_pause[1])
            await asyncio.sleep(self.test_pause[1])

    async def get(self) -> None:
        """The calling user's tracked transfers (ACL mode), newest first."""
        hub_user = self.require_hub_user()
        limit, offset = self.page_arguments()
        if self.access is None:
            page = {"items": [], "total": 0, "limit": limit, "offset": offset}
        else:
            page = self.access.transfers_for(hub_user["name"], limit, offset)
        self.write_json(page)

    async def submit_with_access(
        self,
        hub_name: str,
        globus_user: GlobusUser,
        credential: UserCredential,
        needs: list[AccessNeed],
        request: SubmitRequest,
    ) -> dict[str, t.Any]:
        """Submit, with the rules the transfer needs held around the submit.

        Rules are recorded and created first; if the submit fails they are
        revoked before the error is answered; if it succeeds the task is
        tracked so the reconciler revokes them when it ends.
        """
        access = self.access
        hold = None
        if needs and access is not None:
            hold = await access.open(
                hub_name, globus_user, needs, request.transfer.label
            )
            await self.pause_for_tests(request.transfer.label)

        # the submit and what follows it run as a task of their own: a deadline
        # or a hung-up caller can stop waiting, but a submit that reached Globus
        # is still confirmed (tracked) or its rules revoked, never left half-done
        self._submitting = True
        settle = asyncio.ensure_future(
            self.submit_and_settle(hold, credential, globus_user, request)
        )
        background = self.settings.get("background")
        if background is not None:
            background.add(settle)
            settle.add_done_callback(background.discard)
        return await asyncio.shield(settle)

    async def submit_and_settle(
        self,
        hold: Hold | None,
        credential: UserCredential,
        globus_user: GlobusUser,
        request: SubmitRequest,
    ) -> dict[str, t.Any]:
        access = self.access
        try:
            result = await self.submitter.submit(
                credential, globus_user, request.transfer
            )
            if not result.get("task_id"):
                raise ServiceError(
                    502,
                    "no_task_id",
                    "Globus accepted the submission but returned no task id.",
                    globus_code=result.get("code"),
                    request_id=result.get("request_id"),
                )
        except BaseException:
            if hold is not None and access is not None:
                await access.abandon(hold)
            raise

        if hold is not None and access is not None:
            access.confirm(hold, result["task_id"], credential.refresh_token)
        return result

    async def post(self) -> None:
        # 1. who is calling: decided in prepare(), before the body was read
        hub_user = self.require_hub_user_not_service()

        # 2. is the body sound?
        request = self.parse_body()

        # 3. within the user's limits and the deadline, do the Globus part
        with self.limits.slot(hub_user["name"]):
            answer = await self.within_deadline(self.submit_for(hub_user, request))

        # 4. answer: the extension needs task_id and treats any 2xx as success
        self.write_json(answer, status=201)

    async def within_deadline(self, work: t.Awaitable[T]) -> T:
        """Bound a submission's total time: the caller must always get an answer."""
        self._work = asyncio.ensure_future(work)
        try:
            return await asyncio.wait_for(self._work, self.request_timeout)
        except asyncio.CancelledError:
            if self._caller_gone:
                # nobody will read this answer; it only ends the request cleanly
                raise ServiceError(
                    400, "caller_gone", "The caller closed the connection."
                ) from None
            if not self._stopping:
                raise
            raise ServiceError(
                503,
                "service_stopping",
                "The service is restarting; submit the transfer again in a moment. "
                "Check the Globus web app first: it may have started.",
                headers={"Retry-After": "5"},
            ) from None
        except TimeoutError:
            raise ServiceError(
                504,
                "deadline_exceeded",
                f"Globus did not complete the submission within "
                f"{self.request_timeout:g} s. Check the Globus web app before "
                "trying again: the transfer may have started.",
            ) from None

    def on_connection_close(self) -> None:
        """The caller hung up: drop the work unless the submit already started.

        A transfer nobody waits for would surprise the user, who saw a failure
        and will try again. Once the submit is under way it must finish, so its
        rules are tracked (or revoked) properly.
        """
        if self._work is not None and not self._work.done() and not self._submitting:
            log.warning(
                "Caller of %s left before the submit; dropping its request",
                self.request.path,
            )
            self._caller_gone = True
            self._work.cancel()

    def stop_for_shutdown(self) -> None:
        """Cut short a submission still running when the grace period ends.

        The caller still gets an answer (503), rather than a dropped connection.
        A submission already submitting is left to finish: Globus may have
        started the transfer.
        """
        if self._submitting:
            return
        self._stopping = True
        if self._work is not None and not self._work.done():
            self._work.cancel()

    async def submit_for(
        self, hub_user: dict[str, t.Any], request: SubmitRequest
    ) -> dict[str, t.Any]:
        """The Globus side of a submission, step by step; returns the answer."""
        # whose Globus token is it, and may this hub user use it?
        token = request.globus_token
        if not token:
            raise ServiceError(
                401,
                "globus_token_missing",
                "The body has no globus_token. Set "
                "GLOBUS_TRANSFER_SUBMISSION_IS_HUB_SERVICE=true in the user's "
                "server so the extension sends it.",
            )
        globus_user = await self.submitter.authenticate(token)
        self.check(lambda: self.binding.verify(hub_user, globus_user))

        # may they touch these paths of the hub collection? (ACL mode)
        needs = self.plan_access(request, hub_user["name"])

        # act as the user: a Transfer token from the dependent grant
        credential = await self.submitter.user_credential(token, globus_user)

        # open access (ACL mode), submit, track the task until it ends
        result = await self.submit_with_access(
            hub_user["name"], globus_user, credential, needs, request
        )

        # the request's access line is the one record of the submission
        task_id = result["task_id"]
        self.log_outcome = (
            f"task_id={task_id} items={len(request.transfer.items)} "
            f"globus_identity={globus_user.identity_id}"
        )
        return {
            "task_id": task_id,
            "submission_id": result.get("submission_id"),
            "code": result.get("code"),
            "message": result.get("message"),
            "request_id": result.get("request_id"),
        }


class RulesHandler(APIHandler):
    """``GET api/acls``: every live rule the service tracks, for hub admins."""

    def initialize(  # type: ignore[override]
        self, hub_auth: t.Any, access: AccessManager | None = None, **kwargs: t.Any
    ) -> None:
        super().initialize(hub_auth, **kwargs)
        self.access = access

    async def get(self) -> None:
        hub_user = self.require_hub_user()
        if not hub_user.get("admin"):
            raise ServiceError(
                403, "admin_only", "Only hub admins may list the collection's rules."
            )
        limit, offset = self.page_arguments()
        if self.access is None:
            page = {"items": [], "total": 0, "limit": limit, "offset": offset}
        else:
            page = self.access.live_rules(limit, offset)
        self.write_json(page)


default_handlers: list[tuple[str, type[web.RequestHandler]]] = [
    ("api/transfers", TransfersHandler),
    ("api/acls", RulesHandler),
]
