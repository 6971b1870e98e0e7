"""Turn globus-sdk exceptions into :class:`~hub_transfer.errors.ServiceError`.

The JupyterLab extension shows the user only a generic 503 for any error we
return, so the status, code and message chosen here matter mostly to the admin
reading the log and to API clients; they must still be precise.
"""

from __future__ import annotations

import typing as t

import globus_sdk

from ..errors import ServiceError

# calls made with the service's confidential client credentials
SERVICE_CREDENTIAL_CALLS = frozenset(
    {"introspect", "dependent_token", "refresh_token", "client_credentials"}
)


def consent_scopes(exc: globus_sdk.GlobusAPIError) -> list[str] | None:
    """The scopes Globus says the user must consent to, if this is that error."""
    consent = exc.info.consent_required
    if consent:
        return list(consent.required_scopes or [])
    if exc.code == "ConsentRequired":
        raw = exc.raw_json or {}
        scopes = raw.get("required_scopes")
        return list(scopes) if isinstance(scopes, list) else []
    return None


def from_globus_error(exc: Exception, operation: str) -> ServiceError:
    """Map a failed Globus call to the error we answer with.

    :param exc: what globus-sdk raised
    :param operation: a short name of the call ("submit", "introspect", ...),
        used in the message so the log says which step failed
    """
    # the network never answered: 504 for timeouts, 502 for anything else
    if isinstance(exc, globus_sdk.GlobusTimeoutError):
        return ServiceError(
            504,
            "globus_timeout",
            f"Globus did not answer the {operation} call in time. Try again later.",
        )
    if isinstance(exc, globus_sdk.NetworkError):
        return ServiceError(
            502,
            "globus_unreachable",
            f"Could not reach Globus for the {operation} call: "
            f"{type(getattr(exc, 'exc', exc)).__name__}.",
        )
    if not isinstance(exc, globus_sdk.GlobusAPIError):
        return ServiceError(
            502,
            "globus_failure",
            f"The {operation} call to Globus failed unexpectedly "
            f"({type(exc).__name__}).",
        )

    details: dict[str, t.Any] = {"globus_code": exc.code, "request_id": exc.request_id}
    message = _safe_message(exc)

    # Globus itself failed or is overloaded: a gateway error, not the user's fault
    if exc.http_status >= 500:
        return ServiceError(
            502,
            "globus_unavailable",
            f"Globus failed the {operation} call (HTTP {exc.http_status}): {message}",
            **details,
        )
    if exc.http_status == 429:
        wait = str(exc.headers.get("Retry-After") or "5")
        return ServiceError(
            503,
            "globus_rate_limited",
            f"Globus is rate limiting the {operation} call; try again shortly.",
            headers={"Retry-After": wait if wait.isdigit() else "5"},
            **details,
        )

    # Globus Auth refused our own client: a deployment problem, not the user's.
    # Every Auth call we make carries the service's client credentials.
    is_auth = isinstance(exc, globus_sdk.AuthAPIError)
    if exc.http_status == 401 and (is_auth or operation in SERVICE_CREDENTIAL_CALLS):
        return ServiceError(
            502,
            "service_credentials_rejected",
            "Globus Auth rejected the service's client id or secret; the hub admin "
            "must check GLOBUS_CLIENT_ID and GLOBUS_CLIENT_SECRET.",
            **details,
        )
    # the user's token could not be exchanged: it is stale or lacks consent
    if operation == "dependent_token" and exc.http_status in (400, 403):
        return ServiceError(
            401,
            "dependent_token_denied",
            "Globus Auth would not exchange the user's token for a Transfer token "
            f"({message.rstrip('.')}). Log in to Globus again from JupyterLab.",
            **details,
        )

    # a consent the user has not given (often data_access on a mapped collection)
    scopes = consent_scopes(exc)
    if scopes is not None:
        return ServiceError(
            403,
            "consent_required",
            "Globus needs more consent from the user before this transfer can run: "
            f"{_sentence(message)} Log in to Globus again from JupyterLab to grant it.",
            required_scopes=scopes,
            **details,
        )

    # anything else Globus refused keeps its own status
    return ServiceError(
        exc.http_status,
        "transfer_rejected" if operation == "submit" else f"{operation}_rejected",
        f"Globus refused the {operation} call: {message}",
        **details,
    )


def _safe_message(exc: globus_sdk.GlobusAPIError) -> str:
    """Globus's own message, bounded, with a fallback when it has none.

    Globus error messages describe the request, not credentials, so they are
    safe to pass on; they are truncated so a huge upstream body cannot bloat
    our answer or log.
    """
    message = exc.message or exc.text or f"HTTP {exc.http_status}"
    message = " ".join(str(message).split())
    return message[:500]


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."
