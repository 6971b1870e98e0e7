"""Who a Globus token belongs to, as learnt from introspection."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GlobusUser:
    """The Globus side of a caller, as token introspection described it.

    ``token_hash`` names the token in caches and logs; the token itself is
    carried separately and never stored on this object, so a ``repr`` of it
    can be logged safely.
    """

    identity_id: str
    username: str
    identity_set: tuple[str, ...]
    scopes: frozenset[str]
    expires_at: float
    token_hash: str
