"""A work queue of job keys with client-go workqueue semantics, on one asyncio loop.

What client-go's ``workqueue`` (rate-limiting, delaying) promises, and this
queue too:

* **A key is never processed twice at once.** :meth:`WorkQueue.get` hands a
  key out and marks it *processing*; an :meth:`add` of that key meanwhile
  only marks it *dirty*, and :meth:`done` puts it back in the queue, so the
  change that arrived during the run is seen by a run after it.
* **A key is queued at most once.** Adding a queued key again does nothing
  (except raising its priority, below).
* **Per-key exponential backoff on errors.** :meth:`add_rate_limited`
  re-adds the key after ``base * 2**failures`` seconds (capped);
  :meth:`forget` resets its count once a run succeeds.
* **Delayed adds.** :meth:`add_after` keeps one pending deadline per key, the
  earliest (a later request for a key already waiting changes nothing).
* **Events before resyncs.** Keys added by an event (:meth:`add`) are handed
  out before keys added by the periodic resync (``resync=True``); a
  resync-queued key that then gets an event moves to the front class. With
  hundreds of jobs, a preemption's key does not wait behind the resync.

Everything runs on the event loop's thread: callers must be coroutines or
loop callbacks (the operator's Kopf handlers are ``async`` for this reason).
The clock is injectable so the unit tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import time
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)

EVENT, RESYNC = 0, 1


class ShutDown(Exception):
    """Raised by :meth:`WorkQueue.get` once the queue is shut down."""


class WorkQueue(Generic[K]):
    """Keys to reconcile, each handed to one worker at a time.

    Args:
        base_delay: First backoff delay after an error, seconds.
        max_delay: Cap of the exponential backoff, seconds.
        clock: Monotonic clock in seconds (``time.monotonic`` by default).
    """

    def __init__(self, *, base_delay: float = 0.5, max_delay: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._clock = clock
        self._queues: tuple[collections.deque[tuple[K, int]], ...] = (collections.deque(), collections.deque())
        #: Dirty keys: key -> (priority, token of its live queue entry, or 0 while processing).
        self._dirty: dict[K, tuple[int, int]] = {}
        self._processing: set[K] = set()
        self._failures: dict[K, int] = {}
        self._waiting: dict[K, float] = {}  # key -> earliest deadline of a delayed add
        self._heap: list[tuple[float, int, K, int]] = []
        self._tokens = itertools.count(1)
        self._changed = asyncio.Event()
        self._shut = False

    # -- adding -------------------------------------------------------------
    def add(self, key: K, *, resync: bool = False) -> None:
        """Queue ``key`` now (an event) or as a periodic resync (``resync=True``)."""
        if self._shut:
            return
        prio = RESYNC if resync else EVENT
        cur = self._dirty.get(key)
        if cur is not None:
            if prio < cur[0]:
                self._dirty[key] = (prio, 0)
                if key not in self._processing:
                    self._push(key, prio)
            return
        self._dirty[key] = (prio, 0)
        if key not in self._processing:
            self._push(key, prio)

    def add_after(self, key: K, delay: float, *, resync: bool = False) -> None:
        """Queue ``key`` after ``delay`` s; one pending deadline per key, the earliest wins."""
        if delay <= 0:
            self.add(key, resync=resync)
            return
        if self._shut:
            return
        deadline = self._clock() + delay
        pending = self._waiting.get(key)
        if pending is not None and pending <= deadline:
            return
        self._waiting[key] = deadline
        heapq.heappush(self._heap, (deadline, next(self._tokens), key, RESYNC if resync else EVENT))
        self._changed.set()

    def add_rate_limited(self, key: K) -> float:
        """Re-queue ``key`` after its backoff (it failed again); returns the delay."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(self.max_delay, self.base_delay * (2 ** n))
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The key's run succeeded: its next error starts the backoff anew."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        """Errors in a row of ``key`` (since its last :meth:`forget`)."""
        return self._failures.get(key, 0)

    def discard_delayed(self, key: K) -> None:
        """Drop the pending delayed add of ``key`` (the job is gone)."""
        self._waiting.pop(key, None)

    # -- taking -------------------------------------------------------------
    def get_nowait(self) -> K | None:
        """The next key to process (marked processing), or ``None`` if nothing is ready."""
        if self._shut:
            raise ShutDown()
        self._release_due()
        for q in self._queues:
            while q:
                key, token = q.popleft()
                cur = self._dirty.get(key)
                if cur is None or cur[1] != token or key in self._processing:
                    continue  # a stale entry: the key moved to the event class, or was already taken
                del self._dirty[key]
                self._processing.add(key)
                return key
        return None

    async def get(self) -> K:
        """Wait for the next key; the caller must call :meth:`done` with it."""
        while True:
            key = self.get_nowait()
            if key is not None:
                return key
            self._changed.clear()
            timeout = None
            if self._heap:
                timeout = max(0.0, self._heap[0][0] - self._clock())
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def done(self, key: K) -> None:
        """The run of ``key`` ended; if it was added meanwhile, it is queued again."""
        self._processing.discard(key)
        cur = self._dirty.get(key)
        if cur is not None and not self._shut:
            self._push(key, cur[0])

    def shut_down(self) -> None:
        """Stop handing out keys: waiting and later :meth:`get` calls raise :class:`ShutDown`."""
        self._shut = True
        self._changed.set()

    # -- introspection ------------------------------------------------------
    def __len__(self) -> int:
        """Keys queued (not processing, not delayed)."""
        return sum(1 for k in self._dirty if k not in self._processing)

    def processing(self) -> frozenset[K]:
        return frozenset(self._processing)

    def delayed(self) -> int:
        return len(self._waiting)

    # -- internals ----------------------------------------------------------
    def _push(self, key: K, prio: int) -> None:
        token = next(self._tokens)
        self._dirty[key] = (prio, token)
        self._queues[prio].append((key, token))
        self._changed.set()

    def _release_due(self) -> None:
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            deadline, _, key, prio = heapq.heappop(self._heap)
            if self._waiting.get(key) != deadline:
                continue  # superseded by an earlier deadline, or discarded
            del self._waiting[key]
            self.add(key, resync=prio == RESYNC)
