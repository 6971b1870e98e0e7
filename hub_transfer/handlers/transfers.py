"""POST a transfer: the JupyterLab extension's one call to us.

The handler reads like the path of a submission: who is calling, is the body
sound, whose Globus token is it, submit as the user, answer with the task id.
"""

from __future__ import annotations

import logging
import typing as t

from tornado import web

from ..errors import ServiceError
from ..globus import TransferSubmitter
from ..model import DocumentError, SubmitRequest, parse_submit_body
from .base import APIHandler

log = logging.getLogger(__name__)


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
        **kwargs: t.Any,
    ) -> None:
        super().initialize(hub_auth, **kwargs)
        self.submitter = submitter
        self.max_body_size = max_body_size
        self._chunks: list[bytes] = []
        self._received = 0

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "POST":
            return

        # refuse strangers before reading what they send
        self.require_hub_user()

        content_type = self.request.headers.get("Content-Type", "application/json")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise ServiceError(
                415,
                "unsupported_media_type",
                "Send the transfer document as application/json.",
            )
        declared = self.request.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_body_size:
            raise self._too_large()

    def data_received(self, chunk: bytes) -> None:
        # past the limit, keep reading (to answer cleanly) but stop keeping
        self._received += len(chunk)
        if self._received <= self.max_body_size:
            self._chunks.append(chunk)

    def _too_large(self) -> ServiceError:
        return ServiceError(
            413,
            "body_too_large",
            f"The request body is larger than {self.max_body_size} bytes.",
        )

    def parse_body(self) -> SubmitRequest:
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

    async def post(self) -> None:
        # 1. who is calling: checked in prepare() before the body was read
        hub_user = self.require_hub_user()

        # 2. is the body sound?
        request = self.parse_body()

        # 3. whose Globus token is it?
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

        # 4. submit as the user
        result = await self.submitter.submit(token, globus_user, request.transfer)

        # 5. answer: the extension needs task_id, and treats any 2xx as success
        task_id = result.get("task_id")
        if not task_id:
            raise ServiceError(
                502,
                "no_task_id",
                "Globus accepted the submission but returned no task id.",
                globus_code=result.get("code"),
                request_id=result.get("request_id"),
            )
        self.log_outcome = (
            f"task_id={task_id} items={len(request.transfer.items)} "
            f"globus_identity={globus_user.identity_id}"
        )
        log.info(
            "Submitted transfer %s for hub user %s (Globus %s, %d items)",
            task_id,
            hub_user["name"],
            globus_user.username or globus_user.identity_id,
            len(request.transfer.items),
        )
        self.write_json(
            {
                "task_id": task_id,
                "submission_id": result.get("submission_id"),
                "code": result.get("code"),
                "message": result.get("message"),
                "request_id": result.get("request_id"),
            },
            status=201,
        )


default_handlers: list[tuple[str, type[web.RequestHandler]]] = [
    ("api/transfers", TransfersHandler),
]
