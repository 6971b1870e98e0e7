"""The background loop that ends tracking and revokes rules when tasks end.

It runs on the event loop; its Globus calls go through the submitter's thread
pool like every other. Tasks are polled in batches, one ``task_list`` call per
user per sweep however many tasks that user has, and tasks that have run for a
long time are polled less often. With nothing tracked it sleeps until a new
task is confirmed.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging

from sqlalchemy import func, select

from ..errors import ServiceError
from ..store import CryptKeyError
from ..store.models import Credential, Rule, Submission, utcnow
from .manager import FINAL_STATUSES, AccessManager

log = logging.getLogger(__name__)


class Reconciler:
    """Poll tracked tasks and release the rules of those that ended."""

    def __init__(self, manager: AccessManager, concurrency: int = 4) -> None:
        self.manager = manager
        self.concurrency = concurrency
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------
    # one sweep

    async def sweep(self) -> dict[str, int]:
        """Check every task that is due, end the finished, revoke free rules.

        :returns: counts of what the sweep did, for logs and tests
        """
        now = utcnow()
        due, credentials = self._due(now)

        semaphore = asyncio.Semaphore(self.concurrency)

        async def check(identity: str, tasks: list[tuple[int, str]]) -> int:
            async with semaphore:
                return await self._check_user(identity, tasks, credentials, now)

        ended = sum(
            await asyncio.gather(*(check(i, tasks) for i, tasks in due.items()))
        )
        stale = self._drop_stale_pending(now)
        revoked = await self.manager.revoke_unheld()
        retired = self.manager.drop_idle_credentials()
        await self.manager.retire(retired)
        pruned = self.manager.prune_history(now)
        if ended or stale or revoked or retired:
            log.info(
                "Sweep: %d task(s) ended, %d abandoned submission(s) dropped, "
                "%d rule(s) revoked, %d kept token(s) retired",
                ended,
                stale,
                revoked,
                len(retired),
            )
        return {
            "checked": sum(map(len, due.values())),
            "ended": ended,
            "stale": stale,
            "revoked": revoked,
            "retired": len(retired),
            "pruned": pruned,
        }

    def _due(
        self, now: datetime.datetime
    ) -> tuple[dict[str, list[tuple[int, str]]], dict[str, bytes]]:
        due: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
        with self.manager.ledger.session() as db:
            rows = db.scalars(
                select(Submission).where(
                    Submission.state == "active", Submission.next_check <= now
                )
            )
            for row in rows:
                assert row.task_id is not None
                due[row.identity_id].append((row.id, row.task_id))
            credentials = {
                c.identity_id: c.refresh_token
                for c in db.scalars(
                    select(Credential).where(Credential.identity_id.in_(list(due)))
                )
            }
        return due, credentials

    async def _check_user(
        self,
        identity: str,
        tasks: list[tuple[int, str]],
        credentials: dict[str, bytes],
        now: datetime.datetime,
    ) -> int:
        """Poll one user's due tasks with one call and record what it says."""
        statuses: dict[str, str] = {}
        blob = credentials.get(identity)
        if blob is None:
            log.warning(
                "No kept credential for Globus identity %s: its %d task(s) are "
                "ended only by the maximum lifetime",
                identity,
                len(tasks),
            )
        else:
            try:
                refresh_token = self.manager.keeper.decrypt(blob)
                statuses = await self.manager.globus.task_statuses(
                    identity, refresh_token, [task_id for _, task_id in tasks]
                )
            except (ServiceError, CryptKeyError) as err:
                log.warning(
                    "Could not poll %d task(s) of Globus identity %s: %s",
                    len(tasks),
                    identity,
                    err,
                )
        return self._record(tasks, statuses, now)

    def _record(
        self,
        tasks: list[tuple[int, str]],
        statuses: dict[str, str],
        now: datetime.datetime,
    ) -> int:
        ended = 0
        lifetime = self.manager.lifetime()
        with self.manager.ledger.session() as db:
            for row_id, task_id in tasks:
                row = db.get(Submission, row_id)
                if row is None or row.state != "active":
                    continue
                status = statuses.get(task_id)
                if status:
                    row.task_status = status
                    row.last_checked = now
                if status in FINAL_STATUSES or now - row.created > lifetime:
                    if status not in FINAL_STATUSES:
                        log.warning(
                            "Task %s outlived the maximum lifetime; releasing its "
                            "rules",
                            task_id,
                        )
                    row.state = "ended"
                    row.ended = now
                    row.next_check = None
                    ended += 1
                else:
                    row.next_check = now + self.backoff(now - row.created)
            db.commit()
        return ended

    def backoff(self, age: datetime.timedelta) -> datetime.timedelta:
        """Poll young tasks every poll_interval, then back off linearly with age.

        A task that has run ten minutes is checked half as often, after an hour
        seven times less, never less often than ``max_poll_interval``.
        """
        base = self.manager.poll_interval
        factor = 1 + age.total_seconds() / 600.0
        seconds = min(base * factor, max(base, self.manager.max_poll_interval))
        return datetime.timedelta(seconds=seconds)

    def _drop_stale_pending(self, now: datetime.datetime) -> int:
        limit = now - datetime.timedelta(seconds=self.manager.pending_timeout)
        return self.manager.drop_submissions("pending", Submission.created < limit)

    # ------------------------------------------------------------------
    # the loop

    def next_delay(self) -> float | None:
        """Seconds until the next sweep is needed; None when nothing is tracked.

        Rules still in the ledger without a running task (a revocation Globus
        refused, a request Globus never answered) bring the next sweep forward
        to ``poll_interval``.
        """
        with self.manager.ledger.session() as db:
            soonest = db.scalar(
                select(func.min(Submission.next_check)).where(
                    Submission.state == "active"
                )
            )
            pending = db.scalar(
                select(func.count(Submission.id)).where(Submission.state == "pending")
            )
            rules = db.scalar(select(func.count(Rule.id)))
        if soonest is None:
            if rules:
                return max(1.0, self.manager.poll_interval)
            # pending submissions resolve themselves; check them now and then
            return self.manager.pending_timeout if pending else None
        seconds = (soonest - utcnow()).total_seconds()
        return max(1.0, min(seconds, self.manager.max_poll_interval))

    async def run(self) -> None:
        tracked = self.manager.tracked
        while True:
            tracked.clear()
            try:
                await self.sweep()
                delay = self.next_delay()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Reconciler sweep failed; retrying shortly")
                delay = self.manager.poll_interval
            self.manager.reconciler_idle = delay is None
            try:
                await asyncio.wait_for(tracked.wait(), delay)
            except TimeoutError:
                pass
            self.manager.reconciler_idle = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def __repr__(self) -> str:
        return f"<Reconciler {self.manager.collection_id}>"
