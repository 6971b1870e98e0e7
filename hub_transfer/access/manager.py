"""Open the hub collection for one transfer, and close it again afterwards.

The order of every step is chosen so that a process killed at any moment leaves
a record that the next start can act on:

1. the submission and its rule *intents* are committed before Globus is asked;
2. each rule id Globus returns is committed at once;
3. the transfer is submitted; on failure the rules made for it are deleted;
4. the task id is committed; the reconciler revokes rules when tasks end.

No database transaction is held open across an ``await``: each step is a
short synchronous block, so one slow Globus call never locks the database for
other requests.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import logging
import os
import typing as t

from sqlalchemy import func, select
from traitlets import Float, Instance, Integer, Unicode, default
from traitlets.config import LoggingConfigurable

from ..errors import ServiceError
from ..globus import CollectionACL, GlobusUser, TransferSubmitter
from ..log import token_hash
from ..policy import AccessNeed, covers
from ..store import CryptKeeper, CryptKeyError, Store
from ..store.models import Credential, Rule, Submission, holds, utcnow

log = logging.getLogger(__name__)

# statuses after which Globus will never touch the collection for a task again
FINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED"})


@dataclasses.dataclass
class Hold:
    """An in-progress submission; the ledger links it to the rules it holds."""

    submission_id: int


class AccessManager(LoggingConfigurable):
    """Grant and revoke temporary ACL rules on the hub's guest collection."""

    collection_id = Unicode(
        help="""UUID of the hub's Globus guest collection. When set, the service
        grants each user a temporary ACL rule on the directories a transfer
        needs and removes it when the transfer ends (ACL mode). The service's
        Globus client must hold the Access Manager role on this collection.

        Default: GLOBUS_COLLECTION_ID, else GLOBUS_LOCAL_ENDPOINT. Empty turns
        ACL mode off.
        """
    ).tag(config=True)

    @default("collection_id")
    def _collection_from_env(self) -> str:
        return (
            os.environ.get("GLOBUS_COLLECTION_ID")
            or os.environ.get("GLOBUS_LOCAL_ENDPOINT")
            or ""
        ).strip()

    max_rules = Integer(
        900,
        help="""Rules the service keeps at most on the collection. Globus allows
        1000 per guest collection; beyond this cap new transfers that need a new
        rule get 503 acl_capacity until tasks end and rules are freed.
        """,
    ).tag(config=True)

    max_lifetime = Float(
        7 * 24 * 3600.0,
        help="""Seconds a rule may live, at most. Each rule is created with this
        Globus expiration date, so it dies even if the service never runs again,
        and a task still running after this long stops holding its rules.
        """,
    ).tag(config=True)

    poll_interval = Float(
        30.0,
        help="Seconds between status checks of a freshly submitted task.",
    ).tag(config=True)

    max_poll_interval = Float(
        600.0,
        help="""Seconds between status checks of a task that has run for long;
        checks back off from poll_interval towards this.
        """,
    ).tag(config=True)

    max_rules_per_user = Integer(
        50,
        help="""Rules one Globus identity may hold at once, so that one user
        cannot take the whole collection's cap. Beyond it: 429 acl_user_quota.
        """,
    ).tag(config=True)

    orphan_watch = Float(
        900.0,
        help="""Seconds an unfinished rule request (Globus did not answer, or the
        process died) is looked for at Globus after the fact, so a rule Globus
        creates late is still found and deleted.
        """,
    ).tag(config=True)

    history_retention = Float(
        30 * 24 * 3600.0,
        help="""Seconds the record of an ended transfer is kept for
        GET api/transfers before it is deleted.
        """,
    ).tag(config=True)

    pending_timeout = Float(
        600.0,
        help="""Seconds after which a submission still waiting for its submit is
        considered abandoned and its rules are revoked. (At start, those left
        by a process that died are settled at once.)
        """,
    ).tag(config=True)

    # collaborators, set by the application once ACL mode is known to be on
    store = Instance(Store, allow_none=True)
    submitter = Instance(TransferSubmitter, allow_none=True)
    crypt = Instance(CryptKeeper, allow_none=True)

    @property
    def ledger(self) -> Store:
        assert self.store is not None, "ACL mode needs a store"
        return self.store

    @property
    def globus(self) -> TransferSubmitter:
        assert self.submitter is not None, "ACL mode needs a submitter"
        return self.submitter

    @property
    def keeper(self) -> CryptKeeper:
        assert self.crypt is not None, "ACL mode needs an encryption key"
        return self.crypt

    def __init__(self, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        # one user's rule changes are serialised, so two of their transfers into
        # the same directory share one rule instead of racing to create it
        self._locks: collections.defaultdict[str, asyncio.Lock] = (
            collections.defaultdict(asyncio.Lock)
        )
        # set when a task starts being tracked while the reconciler sleeps with
        # nothing to do; otherwise its next sweep comes soon enough
        self.tracked = asyncio.Event()
        self.reconciler_idle = True
        # identity -> hash of the refresh token the ledger already keeps
        self._kept: dict[str, str] = {}
        self._acl: CollectionACL | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def acl(self) -> CollectionACL:
        if self._acl is None:
            self._acl = CollectionACL(self.globus, self.collection_id)
        return self._acl

    @property
    def enabled(self) -> bool:
        return bool(self.collection_id)

    def lifetime(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.max_lifetime)

    # ------------------------------------------------------------------
    # opening access for one submission

    async def open(
        self,
        hub_user: str,
        globus_user: GlobusUser,
        needs: list[AccessNeed],
        label: str | None,
    ) -> Hold:
        """Make sure every need is met by a live rule held for this submission.

        :raises ServiceError: 503 at the rule cap, 409 when a rule we do not own
            blocks the need, or the Globus error that stopped a rule
        """
        identity = globus_user.identity_id
        async with self._locks[identity]:
            hold, intents, widen = self._plan(hub_user, identity, needs, label)
            try:
                for rule_id in intents:
                    await self._create(rule_id)
                for rule_id, permissions in widen:
                    await self._widen(rule_id, permissions)
            except asyncio.CancelledError:
                # the request's deadline passed: answer now, clean up after
                self.abandon_later(hold)
                raise
            except BaseException:
                await self._release_locked(identity, hold.submission_id)
                raise
        return hold

    def _plan(
        self,
        hub_user: str,
        identity: str,
        needs: list[AccessNeed],
        label: str | None,
    ) -> tuple[Hold, list[int], list[tuple[int, str]]]:
        """Commit the submission and its rule intents before any Globus call."""
        now = utcnow()
        with self.ledger.session() as db:
            submission = Submission(
                hub_user=hub_user,
                identity_id=identity,
                state="pending",
                label=label,
                created=now,
            )
            db.add(submission)
            on_collection = self._rule_count(db)
            live = list(
                db.scalars(
                    select(Rule).where(
                        Rule.collection_id == self.collection_id,
                        Rule.identity_id == identity,
                    )
                )
            )
            intents: list[Rule] = []
            widen: list[tuple[Rule, str]] = []
            for need in needs:
                rule = self._reusable(live, need, now)
                if rule is None:
                    rule = next((r for r in live if r.path == need.path), None)
                    if rule is not None and rule.owned and not rule.globus_rule_id:
                        # an intent left by a dead process: ask Globus again
                        intents.append(rule)
                    elif rule is not None and not rule.owned:
                        raise ServiceError(
                            409,
                            "acl_conflict",
                            f"An ACL rule not made by this service already gives "
                            f"this Globus identity {rule.permissions!r} on "
                            f"{need.path}; ask the collection's manager to widen "
                            "or remove it.",
                        )
                if rule is None:
                    self._check_room(on_collection + len(intents), len(live))
                    rule = Rule(
                        collection_id=self.collection_id,
                        identity_id=identity,
                        path=need.path,
                        permissions=need.permissions,
                        owned=True,
                        created=now,
                        # whole seconds: Globus keeps no more, and the exact
                        # value tells our rules from others' (see _is_ours)
                        expires=(now + self.lifetime()).replace(microsecond=0),
                    )
                    db.add(rule)
                    intents.append(rule)
                    live.append(rule)
                elif rule.globus_rule_id and self._needs_widening(rule, need, now):
                    widen.append((rule, _union(rule.permissions, need.permissions)))
                submission.rules.append(rule)
            db.commit()
            hold = Hold(submission.id)
            return hold, [r.id for r in intents], [(r.id, p) for r, p in widen]

    def _check_room(self, on_collection: int, of_identity: int) -> None:
        """Refuse a new rule past the collection's cap or the user's quota."""
        if on_collection >= self.max_rules:
            raise ServiceError(
                503,
                "acl_capacity",
                f"The hub collection holds the most temporary access rules this "
                f"service may keep ({self.max_rules}). Try again when running "
                "transfers have finished.",
                headers={"Retry-After": "300"},
            )
        if of_identity >= self.max_rules_per_user:
            raise ServiceError(
                429,
                "acl_user_quota",
                f"Your running transfers already hold {of_identity} access rules "
                f"on the hub collection, the most one user may hold "
                f"({self.max_rules_per_user}). Try again when some have finished.",
                headers={"Retry-After": "300"},
            )

    def _reusable(
        self, live: list[Rule], need: AccessNeed, now: datetime.datetime
    ) -> Rule | None:
        """A live rule on the need's directory or an ancestor, with enough access.

        A rule we own qualifies even when it is too narrow or too close to
        expiry, since we can widen it; a rule we do not own must already fit.
        """
        candidates = [
            r
            for r in live
            if r.globus_rule_id
            and need.path.startswith(r.path)
            and (r.owned or covers(r.permissions, need.permissions))
        ]
        fitting = [r for r in candidates if covers(r.permissions, need.permissions)]
        exact = [r for r in candidates if r.path == need.path and r.owned]
        return (fitting or exact or [None])[0]  # type: ignore[list-item]

    def _needs_widening(
        self, rule: Rule, need: AccessNeed, now: datetime.datetime
    ) -> bool:
        if not rule.owned:
            return False
        too_narrow = not covers(rule.permissions, need.permissions)
        too_short = rule.expires is None or rule.expires - now < self.lifetime() / 2
        return too_narrow or too_short

    def _rule_count(self, db: t.Any) -> int:
        return db.scalar(
            select(func.count(Rule.id)).where(Rule.collection_id == self.collection_id)
        )

    async def _create(self, rule_id: int) -> None:
        """Ask Globus for one intended rule and record what it answers."""
        with self.ledger.session() as db:
            rule = db.get(Rule, rule_id)
            assert rule is not None
            identity, path, permissions = rule.identity_id, rule.path, rule.permissions
            expires = rule.expires or utcnow() + self.lifetime()

        globus_id, created, existing = await self.acl.add_rule(
            identity, path, permissions, expires
        )

        with self.ledger.session() as db:
            rule = db.get(Rule, rule_id)
            assert rule is not None
            rule.globus_rule_id = globus_id
            if not created and not _is_ours(existing or {}, rule.expires):
                # Globus had it already: use it, never delete it
                rule.owned = False
                rule.permissions = str((existing or {}).get("permissions", permissions))
                rule.expires = _parse_expiry((existing or {}).get("expiration_date"))
            db.commit()
        log.info(
            "ACL rule %s %s: %s on %s for identity %s",
            globus_id,
            "created" if rule.owned else "already existed (reused, not ours)",
            rule.permissions,
            path,
            identity,
        )
        if not created and not covers(rule.permissions, permissions):
            raise ServiceError(
                409,
                "acl_conflict",
                f"An ACL rule not made by this service already gives this Globus "
                f"identity {rule.permissions!r} on {path}; ask the collection's "
                "manager to widen or remove it.",
            )

    async def _widen(self, rule_id: int, permissions: str) -> None:
        """Widen a rule we own to ``permissions`` and a fresh expiry."""
        with self.ledger.session() as db:
            rule = db.get(Rule, rule_id)
            assert rule is not None and rule.globus_rule_id
            globus_id = rule.globus_rule_id
        expires = (utcnow() + self.lifetime()).replace(microsecond=0)
        await self.acl.update_rule(globus_id, permissions, expires)
        with self.ledger.session() as db:
            rule = db.get(Rule, rule_id)
            assert rule is not None
            rule.permissions = permissions
            rule.expires = expires
            db.commit()
        log.info("ACL rule %s widened to %s until %s", globus_id, permissions, expires)

    # ------------------------------------------------------------------
    # after the submit

    def confirm(self, hold: Hold, task_id: str, refresh_token: str | None) -> None:
        """The transfer is running: track its task until it ends."""
        now = utcnow()
        with self.ledger.session() as db:
            submission = db.get(Submission, hold.submission_id)
            assert submission is not None
            submission.state = "active"
            submission.task_id = task_id
            submission.task_status = "ACTIVE"
            submission.next_check = now + datetime.timedelta(seconds=self.poll_interval)
            replaced = None
            identity = submission.identity_id
            if refresh_token and self._kept.get(identity) != token_hash(refresh_token):
                replaced = self._keep_credential(db, identity, refresh_token)
                self._kept[identity] = token_hash(refresh_token)
            db.commit()
        self.wake_reconciler()
        if replaced:
            self.retire_later([replaced])

    def wake_reconciler(self) -> None:
        """Wake a reconciler that sleeps with nothing to do; a busy one sweeps
        again soon anyway, and waking it from its own sweep would spin it."""
        if self.reconciler_idle:
            self.tracked.set()

    def _keep_credential(
        self, db: t.Any, identity: str, refresh_token: str
    ) -> str | None:
        """Keep the user's newest refresh token; return the one it replaces."""
        credential = db.get(Credential, identity)
        old = None
        if credential is None:
            credential = Credential(identity_id=identity)
            db.add(credential)
        else:
            try:
                old = self.keeper.decrypt(credential.refresh_token)
            except CryptKeyError:
                old = None
            if old == refresh_token:
                return None
        credential.refresh_token = self.keeper.encrypt(refresh_token)
        credential.updated = utcnow()
        return old

    def drop_idle_credentials(self) -> list[str]:
        """Forget the refresh tokens of users with no task left to poll.

        Keeping a credential longer than its tasks need it only widens what a
        stolen database would give away. Returns the tokens, to be revoked.
        """
        busy = select(Submission.identity_id).where(
            Submission.state.in_(("pending", "active"))
        )
        retired: list[str] = []
        with self.ledger.session() as db:
            idle = list(
                db.scalars(
                    select(Credential).where(Credential.identity_id.not_in(busy))
                )
            )
            for credential in idle:
                try:
                    retired.append(self.keeper.decrypt(credential.refresh_token))
                except CryptKeyError:
                    log.warning(
                        "Dropping a kept token of identity %s that no key decrypts",
                        credential.identity_id,
                    )
                db.delete(credential)
            db.commit()
        return retired

    async def retire(self, tokens: list[str]) -> None:
        """Revoke refresh tokens at Globus Auth; failures only cost a log line.

        Revoking a refresh token also ends the access tokens issued with it, so
        the submitter first forgets every cached token that came with it.
        """
        for token in tokens:
            self.globus.forget_refresh_token(token)
            try:
                await self.globus.revoke_token(token)
            except ServiceError as exc:
                log.warning("Could not revoke a retired refresh token: %s", exc)

    def retire_later(self, tokens: list[str]) -> None:
        self._in_background(self.retire(tokens))

    def prune_history(self, now: datetime.datetime) -> int:
        """Delete records of transfers that ended longer ago than the retention."""
        limit = now - datetime.timedelta(seconds=self.history_retention)
        return self.drop_submissions("ended", Submission.ended < limit)

    def drop_submissions(self, state: str, condition: t.Any) -> int:
        """Delete submissions in ``state`` matching ``condition``; their holds go
        with them (the rules themselves are revoked by the next sweep)."""
        with self.ledger.session() as db:
            rows = list(
                db.scalars(
                    select(Submission).where(Submission.state == state, condition)
                )
            )
            for row in rows:
                db.delete(row)
            db.commit()
        return len(rows)

    async def abandon(self, hold: Hold) -> None:
        """The submit failed: drop the submission and revoke what only it held."""
        with self.ledger.session() as db:
            submission = db.get(Submission, hold.submission_id)
            identity = submission.identity_id if submission else None
        if identity is None:
            return
        async with self._locks[identity]:
            await self._release_locked(identity, hold.submission_id)

    def abandon_later(self, hold: Hold) -> None:
        """Abandon in the background, for a request that must answer now.

        If the process dies first, the pending submission is settled by
        :meth:`recover` at the next start.
        """
        self._in_background(self.abandon(hold))

    async def settle_background(self, timeout: float) -> None:
        """Let background clean-ups finish, before the thread pool closes."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)

    def _in_background(self, work: t.Coroutine[t.Any, t.Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release_locked(self, identity: str, submission_id: int) -> None:
        with self.ledger.session() as db:
            submission = db.get(Submission, submission_id)
            if submission is not None:
                db.delete(submission)
                db.commit()
        await self.revoke_unheld(identity)

    # ------------------------------------------------------------------
    # revocation

    async def revoke_unheld(self, identity: str | None = None) -> int:
        """Delete every rule no pending or active submission holds.

        Must be called with the identity's lock held when ``identity`` is
        given; without it, each identity's rules are handled under its lock.

        :returns: how many rules were removed from the ledger
        """
        # one query, however many rules: those no live submission holds
        busy = (
            select(holds.c.rule_id)
            .join(Submission, Submission.id == holds.c.submission_id)
            .where(Submission.state.in_(("pending", "active")))
        )
        query = select(Rule.id, Rule.identity_id).where(
            Rule.collection_id == self.collection_id, Rule.id.not_in(busy)
        )
        if identity is not None:
            query = query.where(Rule.identity_id == identity)
        with self.ledger.session() as db:
            orphans = [(row.id, row.identity_id) for row in db.execute(query)]

        removed = 0
        for rule_id, owner in orphans:
            try:
                if identity is None:
                    async with self._locks[owner]:
                        removed += await self._revoke(rule_id)
                else:
                    removed += await self._revoke(rule_id)
            except ServiceError as exc:
                # the ledger keeps the rule, so the next sweep tries again
                self.wake_reconciler()
                log.warning(
                    "Could not revoke ACL rule #%d yet (%s: %s); will retry",
                    rule_id,
                    exc.error,
                    exc.message,
                )
        return removed

    async def _revoke(self, rule_id: int) -> int:
        """Remove one rule from Globus (if ours) and from the ledger."""
        with self.ledger.session() as db:
            rule = db.get(Rule, rule_id)
            if rule is None or any(
                s.state in ("pending", "active") for s in rule.holders
            ):
                return 0
            globus_id, owned = rule.globus_rule_id, rule.owned
            identity, path, created = rule.identity_id, rule.path, rule.created
            expires = rule.expires

        watching = False
        if owned and globus_id is None:
            # an unanswered request (a timeout, or a process that died): Globus
            # may create the rule late, and a retry still running in a worker
            # thread may create it again, so keep looking for the whole window
            globus_id = await self._find_orphan(identity, path, expires)
            watching = utcnow() - created < datetime.timedelta(
                seconds=self.orphan_watch
            )
            if watching:
                self.wake_reconciler()
        if owned and globus_id:
            await self.acl.delete_rule(globus_id)
            log.info(
                "ACL rule %s revoked: %s for identity %s", globus_id, path, identity
            )
        if watching:
            return 0

        with self.ledger.session() as db:
            rule = db.get(Rule, rule_id)
            if rule is not None:
                db.delete(rule)
                db.commit()
        return 1

    async def _find_orphan(
        self, identity: str, path: str, expires: datetime.datetime | None
    ) -> str | None:
        """The Globus rule an unanswered request may have produced, if any.

        Only a rule carrying the exact expiration date we asked for is taken
        for ours; one the collection's manager made for the same identity and
        path meanwhile is left alone.
        """
        existing = await self.acl.find_rule(identity, path)
        if not existing:
            return None
        if _is_ours(existing, expires):
            return str(existing["id"])
        log.warning(
            "Not revoking ACL rule %s on %r: it was not made by this service",
            existing.get("id"),
            path,
        )
        return None

    async def recover(self) -> None:
        """At start: settle what a previous process left unfinished.

        A submission still ``pending`` never got its task id recorded: its
        process died between planning and confirming. Its rules are revoked (a
        transfer that did reach Globus then fails for lack of access, which is
        the safe way to fail), and intents are looked up at Globus and removed.
        """
        with self.ledger.session() as db:
            pending = list(
                db.scalars(select(Submission).where(Submission.state == "pending"))
            )
            for submission in pending:
                db.delete(submission)
            active = db.scalar(
                select(func.count(Submission.id)).where(Submission.state == "active")
            )
            db.commit()
        removed = await self.revoke_unheld()
        log.info(
            "Recovered the ledger: %d unfinished submission(s) dropped, %d rule(s) "
            "revoked, %d running task(s) still tracked",
            len(pending),
            removed,
            active,
        )
        if active:
            self.tracked.set()

    # ------------------------------------------------------------------
    # views

    def transfers_for(self, hub_user: str, limit: int, offset: int) -> dict:
        with self.ledger.session() as db:
            query = select(Submission).where(Submission.hub_user == hub_user)
            total = db.scalar(select(func.count()).select_from(query.subquery()))
            rows = db.scalars(
                query.order_by(Submission.created.desc()).limit(limit).offset(offset)
            )
            items = [row.to_json() for row in rows]
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    def counts(self) -> tuple[int, int]:
        """(tasks holding rules, rules tracked), for metrics."""
        with self.ledger.session() as db:
            tasks = db.scalar(
                select(func.count(Submission.id)).where(Submission.state == "active")
            )
            rules = db.scalar(select(func.count(Rule.id)))
        return int(tasks or 0), int(rules or 0)

    def live_rules(self, limit: int, offset: int) -> dict:
        with self.ledger.session() as db:
            query = select(Rule).where(Rule.collection_id == self.collection_id)
            total = db.scalar(select(func.count()).select_from(query.subquery()))
            rows = db.scalars(query.order_by(Rule.id).limit(limit).offset(offset))
            items = [row.to_json() for row in rows]
        return {"items": items, "total": total, "limit": limit, "offset": offset}


def _is_ours(existing: dict[str, t.Any], expires: datetime.datetime | None) -> bool:
    """Whether a rule Globus lists is the one we asked for with ``expires``.

    Globus rules carry no owner tag; the expiration date we choose, to the
    second, is the mark that tells ours from a manager's rule on the same path.
    """
    theirs = _parse_expiry(existing.get("expiration_date"))
    if theirs is None or expires is None:
        return False
    return abs((theirs - expires).total_seconds()) < 1


def _union(held: str, needed: str) -> str:
    return "rw" if "w" in held + needed else "r"


def _parse_expiry(value: t.Any) -> datetime.datetime | None:
    """Globus timestamps as naive UTC, or None."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(datetime.UTC).replace(tzinfo=None)
    return parsed
