"""ACL rules on the hub's guest collection, made with the service's own token.

The service's client must hold the Access Manager role on the collection. All
calls go through :meth:`TransferSubmitter.call`, so they run off the event loop
and fail as :class:`~hub_transfer.errors.ServiceError`.
"""

from __future__ import annotations

import datetime
import logging
import typing as t

from ..errors import ServiceError

if t.TYPE_CHECKING:
    from .submitter import TransferSubmitter

log = logging.getLogger(__name__)


class CollectionACL:
    """Add, find, update and delete identity rules on one collection."""

    def __init__(self, submitter: TransferSubmitter, collection_id: str) -> None:
        self.submitter = submitter
        self.collection_id = collection_id

    async def _call(self, operation: str, method: str, *args: t.Any) -> t.Any:
        """One ACL call as the service, the client's creation included.

        Creating the client fetches the service's client-credentials token, a
        network call: it must run in the pool and fail as a ServiceError like
        the call itself, not on the event loop.
        """

        def run() -> t.Any:
            client = self.submitter.service_transfer_client()
            return getattr(client, method)(*args)

        return await self.submitter.call(operation, run)

    async def list_rules(self) -> list[dict[str, t.Any]]:
        """Every rule on the collection (also the start-up permission check)."""
        response = await self._call("acl_list", "endpoint_acl_list", self.collection_id)
        return list(response["DATA"])

    async def add_rule(
        self,
        identity_id: str,
        path: str,
        permissions: str,
        expires: datetime.datetime,
    ) -> tuple[str, bool, dict[str, t.Any] | None]:
        """Grant ``permissions`` on ``path`` to an identity until ``expires``.

        :returns: ``(rule_id, created, existing)``: ``created`` is False when
            Globus already had a rule for this identity and path (an ``Exists``
            answer), in which case ``existing`` is that rule as Globus lists it.
        """
        document = {
            "DATA_TYPE": "access",
            "principal_type": "identity",
            "principal": identity_id,
            "path": path,
            "permissions": permissions,
            "expiration_date": expires.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
        }
        try:
            response = await self._call(
                "acl_add", "add_endpoint_acl_rule", self.collection_id, document
            )
        except ServiceError as err:
            if err.details.get("globus_code") != "Exists":
                raise
            existing = await self.find_rule(identity_id, path)
            if existing is None:
                raise
            return str(existing["id"]), False, existing
        return str(response["access_id"]), True, None

    async def find_rule(self, identity_id: str, path: str) -> dict[str, t.Any] | None:
        """The rule for exactly this identity and path, if Globus has one."""
        for rule in await self.list_rules():
            if rule.get("principal") == identity_id and rule.get("path") == path:
                return rule
        return None

    async def update_rule(
        self, rule_id: str, permissions: str, expires: datetime.datetime
    ) -> None:
        """Widen a rule we own (``r`` to ``rw``) or push its expiry out."""
        await self._call(
            "acl_update",
            "update_endpoint_acl_rule",
            self.collection_id,
            rule_id,
            {
                "DATA_TYPE": "access",
                "permissions": permissions,
                "expiration_date": expires.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
            },
        )

    async def delete_rule(self, rule_id: str) -> None:
        """Delete a rule; one that is already gone counts as deleted."""
        try:
            await self._call(
                "acl_delete", "delete_endpoint_acl_rule", self.collection_id, rule_id
            )
        except ServiceError as err:
            if err.status_code != 404:
                raise
            log.info("ACL rule %s was already gone from Globus", rule_id)
