"""Which directories of the hub's collection a transfer needs, and may it have them.

Pure decisions, no I/O: given the checked transfer document, the hub's guest
collection and the hub user's name, work out the ACL rules the transfer needs
(``r`` to read from the collection, ``rw`` to write to it) and refuse anything
outside the user's own area before a single rule is asked for.
"""

from __future__ import annotations

import dataclasses
import posixpath

from traitlets import Callable, Integer, TraitError, Unicode, validate
from traitlets.config import Configurable

from .model import CONTROL_CHARS, GlobusUser, TransferDocument


class PolicyError(ValueError):
    """A transfer the policy refuses.

    :param status: 400 for a malformed path, 403 for a path outside the area
    :param error: stable short code for the JSON answer
    """

    def __init__(self, status: int, error: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.field = field


@dataclasses.dataclass(frozen=True, order=True)
class AccessNeed:
    """One directory (always ending in ``/``) and the permission it needs."""

    path: str
    permissions: str  # "r" or "rw"


class AccessPolicy(Configurable):
    """Where on the hub's collection each hub user may be granted access."""

    path_template = Unicode(
        "/{username}/",
        help="""Directory of the hub collection a hub user may be granted access
        to, with {username} standing for the hub user's name. Transfers touching
        anything outside it are refused with 403 path_not_allowed. For a
        collection rooted at /home with one directory per user, the default
        /{username}/ fits.
        """,
    ).tag(config=True)

    max_directories = Integer(
        20,
        help="""Directories of the hub collection one transfer may need rules on.
        A transfer spread over more is refused with 400 too_many_directories:
        each directory costs a rule, and rules are a shared, limited resource.
        """,
    ).tag(config=True)

    @validate("path_template")
    def _check_template(self, proposal: dict) -> str:
        value = proposal["value"]
        if "{username}" not in value or not value.startswith("/"):
            raise TraitError(
                "AccessPolicy.path_template must be absolute and contain {username}"
            )
        return value

    def user_root(self, username: str) -> str:
        """The directory ``username`` may reach, normalised, ending in ``/``.

        :raises PolicyError: for names that would escape the template (a name
            with a slash, ``.`` or ``..``), which no hub should produce
        """
        if (
            not username
            or "/" in username
            or username in (".", "..")
            or (CONTROL_CHARS.search(username))
        ):
            raise PolicyError(
                403,
                "path_not_allowed",
                f"Hub user name {username!r} cannot be mapped to a directory.",
            )
        return _as_directory(self.path_template.format(username=username))

    def needs(
        self, document: TransferDocument, collection_id: str, username: str
    ) -> list[AccessNeed]:
        """The ACL rules a transfer needs on ``collection_id``, smallest set first.

        An item needs its parent directory (a file) or itself (a recursive item
        or a path ending in ``/``): read when the collection is the source,
        read-write when it is the destination. Directories inside another needed
        directory with at least the same permission are folded into it.

        :raises PolicyError: for a malformed path (400) or one outside the
            user's area (403)
        """
        wanted: dict[str, str] = {}
        sides = [
            ("source_path", "r", document.source_endpoint == collection_id),
            ("destination_path", "rw", document.destination_endpoint == collection_id),
        ]
        root = self.user_root(username) if any(on for _, _, on in sides) else ""

        for key, permissions, on_collection in sides:
            if not on_collection:
                continue
            for index, item in enumerate(document.items):
                field = f"transfer.DATA[{index}].{key}"
                path = normalise_path(getattr(item, key), field)
                directory = (
                    path
                    if item.recursive or path.endswith("/")
                    else (_as_directory(posixpath.dirname(path)))
                )
                directory = _as_directory(directory)
                if not directory.startswith(root):
                    raise PolicyError(
                        403,
                        "path_not_allowed",
                        f"{field} ({path}) is outside {root}, the only part of the "
                        "hub collection this user may transfer to or from.",
                        field,
                    )
                if wanted.get(directory) != "rw":
                    wanted[directory] = permissions

        needs = _fold(wanted)
        if len(needs) > self.max_directories:
            raise PolicyError(
                400,
                "too_many_directories",
                f"This transfer touches {len(needs)} directories of the hub "
                f"collection; at most {self.max_directories} are allowed in one "
                "transfer. Group the files, or transfer a parent directory.",
                "transfer.DATA",
            )
        return needs


def normalise_path(path: str, field: str) -> str:
    """Check a path on the hub collection and return it in canonical form.

    Only absolute paths made of plain segments are accepted: no ``..`` or ``.``,
    no empty segments, no ``~`` (which Globus would resolve against a home
    directory we cannot see), no control characters.
    """
    if CONTROL_CHARS.search(path):
        raise PolicyError(
            400, "invalid_path", f"{field} contains a control character.", field
        )
    if not path.startswith("/"):
        raise PolicyError(
            400,
            "invalid_path",
            f"{field} must be an absolute path on the hub collection (no '~', no "
            "relative paths).",
            field,
        )
    trailing = path.endswith("/") and path != "/"
    inner = path[1:-1] if trailing else path[1:]
    segments = inner.split("/") if inner else []
    for segment in segments:
        if segment in ("", ".", "..") or segment.startswith("~"):
            raise PolicyError(
                400,
                "invalid_path",
                f"{field} has an empty, '.', '..' or '~' segment.",
                field,
            )
    canonical = "/" + "/".join(segments)
    return canonical + "/" if trailing else canonical


def _as_directory(path: str) -> str:
    return path if path.endswith("/") else path + "/"


def _fold(wanted: dict[str, str]) -> list[AccessNeed]:
    """Drop directories already covered by a needed ancestor with enough access."""
    kept: list[AccessNeed] = []
    for path in sorted(wanted, key=len):
        permissions = wanted[path]
        covered = any(
            path.startswith(parent.path) and covers(parent.permissions, permissions)
            for parent in kept
        )
        if not covered:
            kept.append(AccessNeed(path, permissions))
    return sorted(kept)


def covers(held: str, needed: str) -> bool:
    """Whether a rule with ``held`` permissions serves a need for ``needed``."""
    return held == "rw" or held == needed


class IdentityBinding(Configurable):
    """Optionally tie each hub user to one Globus identity.

    Off by default: the hub vouches for the hub user, Globus for the Globus
    identity, and a user may link whatever Globus account they like. Sites
    where both come from the same campus login can insist that they match, so a
    leaked Globus token cannot be used from another hub account.
    """

    globus_username_template = Unicode(
        "",
        help="""When set, the Globus username behind the token must equal this
        template with {username} replaced by the hub user's name, compared
        without regard to case; e.g. {username}@uchicago.edu. Otherwise: 403
        identity_mismatch. Empty (the default) accepts any Globus identity.
        """,
    ).tag(config=True)

    check = Callable(
        None,
        allow_none=True,
        help="""A function (hub_user_model, globus_username, identity_ids) -> bool
        deciding whether the Globus identity may act for the hub user. Takes
        precedence over globus_username_template. Must not do I/O.
        """,
    ).tag(config=True)

    @property
    def enabled(self) -> bool:
        return self.check is not None or bool(self.globus_username_template)

    def verify(self, hub_user: dict, globus_user: GlobusUser) -> None:
        """:raises PolicyError: 403 identity_mismatch when the binding fails"""
        if not self.enabled:
            return
        if self.check is not None:
            allowed = bool(
                self.check(hub_user, globus_user.username, globus_user.identity_set)
            )
        else:
            expected = self.globus_username_template.format(username=hub_user["name"])
            allowed = globus_user.username.casefold() == expected.casefold()
        if not allowed:
            raise PolicyError(
                403,
                "identity_mismatch",
                f"The Globus identity {globus_user.username!r} may not be used by "
                f"hub user {hub_user['name']!r} on this hub. Log in to Globus from "
                "JupyterLab with your own institutional account.",
            )
