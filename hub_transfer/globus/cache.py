"""A small bounded cache with per-entry expiry and shared in-flight loads.

Used for token introspection results and dependent tokens, which are costly
Globus round trips that many requests of one user repeat within seconds. Lives
on the event loop only (no locks): values are computed in a thread pool but
stored from the loop.
"""

from __future__ import annotations

import asyncio
import collections
import time
import typing as t

K = t.TypeVar("K")
V = t.TypeVar("V")


class ExpiringLRU(t.Generic[K, V]):
    """Least-recently-used cache whose entries also expire at a given time.

    :param maxsize: entries kept at most; the least recently used goes first
    :param clock: monotonic-style clock, replaceable in tests
    """

    def __init__(
        self, maxsize: int, clock: t.Callable[[], float] = time.monotonic
    ) -> None:
        self.maxsize = maxsize
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self._data: collections.OrderedDict[K, tuple[float, V]] = (
            collections.OrderedDict()
        )
        self._inflight: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        """The live value for ``key``, or None (counted as a miss)."""
        entry = self._data.get(key)
        if entry is not None and entry[0] > self.clock():
            self._data.move_to_end(key)
            self.hits += 1
            return entry[1]
        if entry is not None:
            del self._data[key]
        self.misses += 1
        return None

    def put(self, key: K, value: V, ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds; a non-positive ttl keeps nothing."""
        if ttl <= 0 or self.maxsize <= 0:
            self._data.pop(key, None)
            return
        self._data[key] = (self.clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def discard(self, key: K) -> None:
        self._data.pop(key, None)

    def discard_where(self, predicate: t.Callable[[V], bool]) -> int:
        """Drop every entry whose value matches; returns how many went."""
        doomed = [key for key, (_, value) in self._data.items() if predicate(value)]
        for key in doomed:
            del self._data[key]
        return len(doomed)

    def clear(self) -> None:
        self._data.clear()

    async def get_or_load(
        self,
        key: K,
        load: t.Callable[[], t.Awaitable[tuple[V, float]]],
    ) -> V:
        """Return the cached value, or run ``load`` once for all waiters.

        ``load`` returns ``(value, ttl)``. When several requests miss on the same
        key at once (a user clicking Transfer on several files), only one load
        runs and the rest await it, so Globus sees one call. The load runs as a
        task of its own: a waiter cut short by its deadline does not cancel it
        for the others. Exceptions reach every waiter and nothing is cached.
        """
        value = self.get(key)
        if value is not None:
            return value

        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(key, load))
            self._inflight[key] = task
            # no waiter left to see a failure must not make asyncio complain
            task.add_done_callback(_observe)
        return await asyncio.shield(task)

    async def _load(
        self, key: K, load: t.Callable[[], t.Awaitable[tuple[V, float]]]
    ) -> V:
        try:
            value, ttl = await load()
            self.put(key, value, ttl)
            return value
        finally:
            self._inflight.pop(key, None)

    def stats(self) -> dict[str, int]:
        return {"size": len(self._data), "hits": self.hits, "misses": self.misses}


def _observe(task: asyncio.Future[t.Any]) -> None:
    if not task.cancelled():
        task.exception()
