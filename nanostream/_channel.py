"""Bounded channels between stages.

A :class:`Channel` is a FIFO of items with a capacity counted in items. Producers
append lists of items (``put_many``) or single items (``put``); the consumer takes
whatever is queued, up to a limit, in one call (``get``). Items therefore move
between threads in batches whenever the consumer is behind, yet an item appended
to an idle channel is visible to its consumer at once: nothing waits for a batch
to fill.

The fast paths touch no lock: ``collections.deque`` appends and pops are atomic
under CPython's GIL, and the lock (with its two conditions) is taken only when a
side has to sleep or wake the other.  The races between "check, then sleep" and
"append, then check for sleepers" are closed by setting the waiting counter *before*
re-checking the queue under the lock, and reading it *after* appending.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat, starmap
from typing import Any

__all__ = ["Aborted", "Channel", "ChannelStats"]


class Aborted(Exception):
    """Raised inside stage threads when the run is being torn down."""


@dataclass(frozen=True)
class ChannelStats:
    """A snapshot of a channel: what :meth:`nanostream.Run.stats` and the progress
    display read.

    >>> ChannelStats(queued=3, capacity=8, waiting_producers=0, waiting_consumers=0).fill
    0.375
    """

    queued: int
    capacity: int
    waiting_producers: int
    waiting_consumers: int

    @property
    def fill(self) -> float:
        """Fraction of the capacity in use (may exceed 1.0 briefly with fan-in)."""
        return self.queued / self.capacity if self.capacity else 0.0


class Channel:
    """A bounded multi-producer queue of items with explicit close and abort.

    ``producers`` is the number of upstream ends that will each call :meth:`close`
    once; the consumer sees end of stream (``get`` returns ``None``) after all of
    them closed and the queue is empty.

    >>> ch = Channel(capacity=4)
    >>> ch.put_many([1, 2]); ch.put(3); ch.close()
    >>> ch.get(10), ch.get(10)
    ([1, 2, 3], None)
    """

    def __init__(self, capacity: int = 1024, *, producers: int = 1, consumers: int = 1,
                 name: str = "", on_discard: Callable[[list[Any]], None] | None = None) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int, got {type(capacity).__name__}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if producers < 1:
            raise ValueError(f"producers must be >= 1, got {producers}")
        self.name = name
        self.capacity = capacity
        self._dq: deque[Any] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._get_waiting = 0
        self._put_waiting = 0
        self._woken = False  # a waiting consumer was notified and has not run yet
        self._open = producers
        self._multi = consumers > 1
        self._aborted = False
        self.discarding = False
        self._on_discard = on_discard

    # -- producer side -------------------------------------------------------

    def put(self, item: Any) -> None:
        """Append one item, blocking while the channel is full."""
        dq = self._dq
        if len(dq) >= self.capacity or self.discarding or self._aborted:
            self._put_slow([item])
            return
        dq.append(item)
        if self._get_waiting and not self._woken:
            self._wake()

    def put_many(self, items: list[Any]) -> None:
        """Append a list of items, blocking while they do not fit.

        A list longer than the capacity is accepted whole once the channel is
        empty, so a large batch can never deadlock.
        """
        if not items:
            return
        dq = self._dq
        n = len(dq)
        if (n and n + len(items) > self.capacity) or self.discarding or self._aborted:
            self._put_slow(items)
            return
        dq.extend(items)
        if self._get_waiting and not self._woken:
            self._wake()

    def _wake(self) -> None:
        """Wake the waiting consumer, once: until it runs, further puts need not
        take the lock again (a fast producer would otherwise notify per item)."""
        with self._lock:
            if not self._multi:
                self._woken = True
            self._not_empty.notify()

    def _put_slow(self, items: list[Any]) -> None:
        dq = self._dq
        with self._lock:
            # counted as waiting *before* looking at the queue, so a consumer that
            # empties it from now on sees the count and wakes us (no lost wake-up)
            self._put_waiting += 1
            try:
                while True:
                    if self._aborted:
                        raise Aborted
                    if self.discarding:
                        drop = items
                        break
                    n = len(dq)
                    if not n or n + len(items) <= self.capacity:
                        dq.extend(items)
                        if self._get_waiting:
                            self._not_empty.notify()
                        return
                    self._not_full.wait()
            finally:
                self._put_waiting -= 1
        if self._on_discard is not None:
            self._on_discard(drop)

    def close(self) -> None:
        """One producer is done. After the last one, the consumer sees the end."""
        with self._lock:
            self._open -= 1
            if self._open <= 0:
                self._not_empty.notify_all()

    # -- consumer side -------------------------------------------------------

    def get(self, limit: int = 1 << 30, timeout: float | None = None) -> list[Any] | None:
        """Take up to ``limit`` queued items, waiting for at least one.

        Returns ``None`` at end of stream and ``[]`` when ``timeout`` (seconds)
        passed with nothing to take. Raises :class:`Aborted` once aborted.
        """
        dq = self._dq
        if dq and not self._multi and not self._aborted:
            n = len(dq)
            if n > limit:
                n = limit
            items = list(starmap(dq.popleft, repeat((), n)))
            if self._put_waiting:
                with self._lock:
                    self._not_full.notify_all()
            return items
        return self._get_slow(limit, timeout)

    def _get_slow(self, limit: int, timeout: float | None) -> list[Any] | None:
        dq = self._dq
        with self._lock:
            # counted as waiting *before* looking at the queue (see _put_slow)
            self._get_waiting += 1
            try:
                while True:
                    self._woken = False  # from here on a producer must notify again
                    if dq:
                        break
                    if self._aborted:
                        raise Aborted
                    if self._open <= 0:
                        return None
                    signalled = self._not_empty.wait(timeout)
                    if not signalled and not dq:
                        if self._aborted:
                            raise Aborted
                        return [] if self._open > 0 else None
            finally:
                self._get_waiting -= 1
            if self._aborted:
                raise Aborted
            n = min(len(dq), limit)
            items = list(starmap(dq.popleft, repeat((), n)))
            if self._put_waiting:
                self._not_full.notify_all()
            if dq and self._get_waiting:
                self._not_empty.notify()
            return items

    # -- teardown ------------------------------------------------------------

    def discard(self) -> None:
        """The consumer wants no more items: drop what is queued and whatever
        producers put from now on (each dropped batch goes to ``on_discard``)."""
        with self._lock:
            self.discarding = True
            dropped = list(self._dq)
            self._dq.clear()
            self._not_full.notify_all()
            self._not_empty.notify_all()
        if dropped and self._on_discard is not None:
            self._on_discard(dropped)

    def abort(self) -> None:
        """Wake every waiter; from now on ``get`` and ``put`` raise :class:`Aborted`."""
        with self._lock:
            self._aborted = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    @property
    def closed(self) -> bool:
        return self._open <= 0

    def stats(self) -> ChannelStats:
        return ChannelStats(len(self._dq), self.capacity, self._put_waiting, self._get_waiting)

    def __len__(self) -> int:
        return len(self._dq)

    def __repr__(self) -> str:
        state = "aborted" if self._aborted else "closed" if self._open <= 0 else "open"
        return f"<Channel {self.name!r} {len(self._dq)}/{self.capacity} {state}>"
