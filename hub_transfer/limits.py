"""Per-user limits on submissions, so one user cannot crowd out the rest.

Each hub user may have a few submissions in flight and a bounded number per
minute. Both live in memory: the service runs as one process, and a restart
forgetting recent counts is harmless.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
import typing as t

from traitlets import Integer
from traitlets.config import Configurable

from .errors import ServiceError

WINDOW = 60.0


class UserLimits(Configurable):
    """Concurrency and rate limits per hub user."""

    max_concurrent = Integer(
        4,
        help="""Submissions one hub user may have in flight at once. More get 429
        with Retry-After. Bounds how many Globus worker threads one user can hold.
        """,
    ).tag(config=True)

    per_minute = Integer(
        60,
        help="Submissions one hub user may start per minute; more get 429.",
    ).tag(config=True)

    def __init__(self, clock: t.Callable[[], float] = time.monotonic, **kwargs: t.Any):
        super().__init__(**kwargs)
        self.clock = clock
        self._active: collections.Counter[str] = collections.Counter()
        self._recent: dict[str, collections.deque[float]] = {}

    @contextlib.contextmanager
    def slot(self, user: str) -> t.Iterator[None]:
        """Hold one of ``user``'s slots for the duration of a submission.

        :raises ServiceError: 429 with ``Retry-After`` when a limit is reached
        """
        now = self.clock()
        recent = self._recent.setdefault(user, collections.deque())
        while recent and recent[0] <= now - WINDOW:
            recent.popleft()

        if self._active[user] >= self.max_concurrent:
            raise ServiceError(
                429,
                "too_many_concurrent",
                f"{self.max_concurrent} transfers of yours are still being "
                "submitted; try again in a moment.",
                headers={"Retry-After": "1"},
            )
        if len(recent) >= self.per_minute:
            wait = max(1, math.ceil(recent[0] + WINDOW - now))
            raise ServiceError(
                429,
                "rate_limited",
                f"More than {self.per_minute} transfers in a minute; try again in "
                f"{wait} s.",
                headers={"Retry-After": str(wait)},
            )

        recent.append(now)
        self._active[user] += 1
        try:
            yield
        finally:
            self._active[user] -= 1
            if self._active[user] <= 0:
                del self._active[user]
            self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        """Drop users with nothing in the window, so memory stays bounded."""
        if len(self._recent) < 1024:
            return
        for user in [
            u for u, q in self._recent.items() if not q or q[-1] <= now - WINDOW
        ]:
            del self._recent[user]
