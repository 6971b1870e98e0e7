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

    def clear(self) -> None:
        self._data.clear()

    async def get_or_load(
        self,
        key: K,
        load: t.Callable[[], t.Awaitable[tuple[V, float]]],
    ) -> V:
        """Return the cached value, or run ``load`` once for all waiters.

        ``load`` returns ``(value, ttl)``. When several requests miss on the same
        key at once (a user clicking Transfer on several files), only the first
        runs ``load``; the rest await its result, so Globus sees one call.
        Exceptions reach every waiter and nothing is cached.
        """
        value = self.get(key)
        if value is not None:
            return value

        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)

        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value, ttl = await load()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            # mark retrieved so an unobserved failure is not logged at exit
            future.exception()
            raise
        else:
            self.put(key, value, ttl)
            future.set_result(value)
            return value
        finally:
            self._inflight.pop(key, None)

    def stats(self) -> dict[str, int]:
        return {"size": len(self._data), "hits": self.hits, "misses": self.misses}
