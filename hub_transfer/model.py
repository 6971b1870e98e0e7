"""The transfer document the JupyterLab extension sends, parsed and checked.

Nothing here does I/O: it turns a request body into a :class:`SubmitRequest` or
raises :class:`DocumentError` naming the field at fault, so the handler can
answer 400 before any Globus call is made and the caller learns exactly what to
fix.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

# Globus Transfer's own limit for task labels.
MAX_LABEL_LENGTH = 128
# Longer paths than this are refused before they reach Globus; no filesystem
# behind a collection accepts them anyway.
MAX_PATH_LENGTH = 4096
# C0 and C1 controls, line and paragraph separators, and bidirectional
# overrides: none belongs in a path or label, and each can forge log lines or
# disguise a path when shown to a person
CONTROL_CHARS = re.compile(
    r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


class DocumentError(ValueError):
    """The body is not a transfer document we can submit.

    :param field: dotted path of the offending field, e.g.
        ``transfer.DATA[2].source_path``, so a client can point at it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class TransferItem:
    source_path: str
    destination_path: str
    recursive: bool = False


@dataclasses.dataclass(frozen=True)
class TransferDocument:
    """A transfer as we will submit it: endpoints normalised, items checked."""

    source_endpoint: str
    destination_endpoint: str
    items: tuple[TransferItem, ...]
    label: str | None = None


@dataclasses.dataclass(frozen=True)
class GlobusUser:
    """The Globus side of a caller, as token introspection described it.

    ``token_hash`` (the full SHA-256 of the token) keys the token caches; the
    token itself is carried separately and never stored on this object, so a
    ``repr`` of it can be logged safely.
    """

    identity_id: str
    username: str
    identity_set: tuple[str, ...]
    scopes: frozenset[str]
    expires_at: float
    token_hash: str


@dataclasses.dataclass(frozen=True)
class SubmitRequest:
    """The whole POST body: the user's Globus token and the transfer."""

    globus_token: str | None
    transfer: TransferDocument


def parse_submit_body(body: bytes, *, max_items: int) -> SubmitRequest:
    """Parse and check a submission body.

    :param body: the raw request body
    :param max_items: the most ``DATA`` items one submission may carry
    :raises DocumentError: naming the first field that is wrong
    """
    # decode: JSON, and an object at the top
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DocumentError(
            "body", "The request body is not valid JSON (or is nested too deeply)."
        ) from None
    if not isinstance(data, dict):
        raise DocumentError("body", "The request body must be a JSON object.")

    # the user's Globus token travels in the body; its absence is decided later
    # (401, not 400), so only its type is checked here
    token = data.get("globus_token")
    if token is not None and not isinstance(token, str):
        raise DocumentError("globus_token", "globus_token must be a string.")
    if token and (CONTROL_CHARS.search(token) or not token.isascii()):
        raise DocumentError("globus_token", "globus_token is not a Globus token.")

    if "transfer" not in data:
        raise DocumentError("transfer", "The body has no 'transfer' document.")
    transfer = parse_transfer(data["transfer"], max_items=max_items)
    return SubmitRequest(globus_token=token or None, transfer=transfer)


def parse_transfer(doc: object, *, max_items: int) -> TransferDocument:
    """Check one transfer document as the extension builds it."""
    if not isinstance(doc, dict):
        raise DocumentError("transfer", "'transfer' must be a JSON object.")

    source = _endpoint(doc, "source_endpoint")
    destination = _endpoint(doc, "destination_endpoint")

    items = doc.get("DATA")
    if not isinstance(items, list) or not items:
        raise DocumentError(
            "transfer.DATA", "DATA must be a non-empty list of transfer items."
        )
    if len(items) > max_items:
        raise DocumentError(
            "transfer.DATA",
            f"DATA has {len(items)} items; at most {max_items} are allowed in one "
            "transfer. Split it into several transfers.",
        )
    parsed = tuple(_item(item, f"transfer.DATA[{i}]") for i, item in enumerate(items))

    return TransferDocument(
        source_endpoint=source,
        destination_endpoint=destination,
        items=parsed,
        label=_label(doc.get("label")),
    )


def _endpoint(doc: dict, key: str) -> str:
    value = doc.get(key)
    field = f"transfer.{key}"
    if not isinstance(value, str):
        raise DocumentError(field, f"{key} must be a collection UUID string.")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise DocumentError(field, f"{key} is not a UUID.") from None
    # uuid.UUID also accepts braces, URNs and missing dashes; Globus does not
    if str(parsed) != value.lower():
        raise DocumentError(field, f"{key} must be a UUID in canonical form.")
    return str(parsed)


def _item(item: object, field: str) -> TransferItem:
    if not isinstance(item, dict):
        raise DocumentError(field, "Each DATA item must be a JSON object.")

    # the seed document's example writes "destination"; the extension sends
    # "destination_path"; both mean the same
    destination = item.get("destination_path", item.get("destination"))
    recursive = item.get("recursive", False)
    if recursive is None:
        recursive = False
    if not isinstance(recursive, bool):
        raise DocumentError(f"{field}.recursive", "recursive must be true or false.")

    return TransferItem(
        source_path=_path(item.get("source_path"), f"{field}.source_path"),
        destination_path=_path(destination, f"{field}.destination_path"),
        recursive=recursive,
    )


def _path(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise DocumentError(field, f"{field} must be a non-empty string.")
    if len(value) > MAX_PATH_LENGTH:
        raise DocumentError(
            field, f"{field} is longer than {MAX_PATH_LENGTH} characters."
        )
    if CONTROL_CHARS.search(value):
        raise DocumentError(field, f"{field} contains a control character.")
    return value


def _label(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DocumentError("transfer.label", "label must be a string or null.")

    # surrounding spaces are an accident of typing, not meaning; Globus refuses
    # them, so trim rather than fail the whole transfer
    value = value.strip()
    if not value:
        return None
    if len(value) > MAX_LABEL_LENGTH:
        raise DocumentError(
            "transfer.label",
            f"label is longer than Globus allows ({MAX_LABEL_LENGTH} characters).",
        )
    if CONTROL_CHARS.search(value):
        raise DocumentError(
            "transfer.label", "label must not contain newlines or control characters."
        )
    return value
