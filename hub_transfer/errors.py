"""The one error type every layer raises when a request must fail.

A :class:`ServiceError` carries everything the JSON error body needs: the HTTP
status, a short stable ``error`` code that API clients can match on, a message a
person can act on, and optional details (the Globus ``code`` and ``request_id``,
the scopes a consent needs). Handlers turn it into JSON; nothing else formats
errors, so every failure looks the same on the wire and in the log.

Messages must never contain a token or a secret: they reach the client and the
log verbatim.
"""

from __future__ import annotations

import typing as t

from tornado import web


class ServiceError(web.HTTPError):
    """A request failure with a stable code and a safe, human message.

    It subclasses tornado's ``HTTPError`` so that raising it anywhere in a
    handler's call chain ends in ``write_error`` with the right status.
    """

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **details: t.Any,
    ) -> None:
        # log_message stays None: tornado would otherwise %-format it and log it
        # a second time; our request log line carries the detail instead
        super().__init__(status, reason=None)
        self.error = error
        self.message = message
        self.headers = headers or {}
        self.details = {k: v for k, v in details.items() if v is not None}

    def to_json(self) -> dict[str, t.Any]:
        """The response body: JupyterHub's ``status``/``message`` plus our code."""
        body: dict[str, t.Any] = {
            "status": self.status_code,
            "error": self.error,
            "message": self.message,
        }
        body.update(self.details)
        return body

    def __str__(self) -> str:
        return f"{self.status_code} {self.error}: {self.message}"
