"""Which Kafka offsets are safe to commit, for at-least-once delivery.

A source hands each consumed message to the pipeline and calls
:meth:`OffsetTracker.track`; when everything derived from the message has been handled
(possibly on another thread, in any order) it calls :meth:`OffsetTracker.done`. The
tracker tells which position each partition may commit: one past the highest offset
that is done together with every offset tracked before it. No Kafka import here.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping

__all__ = ["OffsetTracker", "TopicPartition"]

TopicPartition = tuple[str, int]


class _Partition:
    """Offsets of one partition between the commit position and the newest tracked."""

    __slots__ = ("committed", "generation", "last", "pending", "position", "status")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.pending: deque[int] = deque()  # tracked offsets not yet released, increasing
        self.status: dict[int, bool] = {}  # offset in pending -> done?
        self.last = -1  # newest tracked offset
        self.position: int | None = None  # next offset to commit, None before any is done
        self.committed: int | None = None  # position last passed to mark_committed


class OffsetTracker:
    """Per-partition commit positions for messages that finish in any order.

    Thread-safe; ``track`` and ``done`` are O(1) amortised. Offsets of a partition must
    be tracked in increasing order and may have gaps (compacted topics, transaction
    markers): the position after offset ``o`` is ``o + 1`` whether or not ``o + 1``
    exists.

    >>> tracker = OffsetTracker()
    >>> _ = [tracker.track("clicks", 0, offset) for offset in (10, 11, 15)]
    >>> tracker.done("clicks", 0, 11); tracker.committable()
    {}
    >>> tracker.done("clicks", 0, 10); tracker.committable()
    {('clicks', 0): 12}
    >>> tracker.mark_committed({("clicks", 0): 12}); tracker.committable()
    {}
    >>> tracker.done("clicks", 0, 15); tracker.committable(), tracker.in_flight()
    ({('clicks', 0): 16}, 0)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._generations = 0
        self._in_flight = 0

    def track(self, topic: str, partition: int, offset: int) -> int:
        """Record that the message at ``offset`` was handed to the pipeline.

        Returns the partition's generation: pass it to :meth:`done` so that a message
        from before a :meth:`revoke` stays ignored even once the partition is assigned
        (and its offsets tracked) again.
        """
        key = (topic, partition)
        with self._lock:
            state = self._partitions.get(key)
            if state is None:
                self._generations += 1
                state = self._partitions[key] = _Partition(self._generations)
            elif offset <= state.last:
                raise ValueError(
                    f"offsets of {key} must be tracked in increasing order, "
                    f"got {offset} after {state.last}"
                )
            state.last = offset
            state.pending.append(offset)
            state.status[offset] = False
            self._in_flight += 1
            return state.generation

    def done(self, topic: str, partition: int, offset: int, generation: int | None = None) -> None:
        """Record that everything derived from the message at ``offset`` is handled.

        Any thread, any order. A no-op for a partition that was revoked, for an offset
        already done, and when ``generation`` is not the partition's current one.
        """
        with self._lock:
            state = self._partitions.get((topic, partition))
            if state is None or (generation is not None and generation != state.generation):
                return
            status = state.status
            if status.get(offset, True):  # done before, or not pending
                if offset > state.last:
                    raise ValueError(
                        f"offset {offset} of {(topic, partition)} is done but was never "
                        f"tracked (newest tracked: {state.last})"
                    )
                return
            status[offset] = True
            self._in_flight -= 1
            pending = state.pending
            if pending[0] != offset:
                return
            while pending and status[pending[0]]:
                released = pending.popleft()
                del status[released]
            state.position = released + 1

    def committable(self) -> dict[TopicPartition, int]:
        """``{(topic, partition): next offset to commit}`` for each partition whose
        position moved since it was last passed to :meth:`mark_committed`."""
        with self._lock:
            return {
                key: state.position
                for key, state in self._partitions.items()
                if state.position is not None and state.position != state.committed
            }

    def mark_committed(self, positions: Mapping[TopicPartition, int]) -> None:
        """Record that ``positions`` (as returned by :meth:`committable`) were committed.

        Positions of revoked partitions are ignored; a position never moves back.
        """
        with self._lock:
            for key, position in positions.items():
                state = self._partitions.get(key)
                if state is not None and (state.committed is None or position > state.committed):
                    state.committed = position

    def revoke(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Forget ``partitions``; later :meth:`done` calls for their offsets are no-ops.

        Returns their positions not yet marked committed, for a last commit before the
        partitions go to another consumer.
        """
        final: dict[TopicPartition, int] = {}
        with self._lock:
            for topic, partition in partitions:
                key = (topic, partition)
                state = self._partitions.pop(key, None)
                if state is None:
                    continue
                self._in_flight -= sum(1 for is_done in state.status.values() if not is_done)
                if state.position is not None and state.position != state.committed:
                    final[key] = state.position
        return final

    def in_flight(self) -> int:
        """How many tracked messages are not done yet (revoked partitions excluded)."""
        with self._lock:
            return self._in_flight

    def partitions(self) -> list[TopicPartition]:
        """The partitions currently tracked."""
        with self._lock:
            return list(self._partitions)

    def __repr__(self) -> str:
        with self._lock:
            return f"OffsetTracker(partitions={len(self._partitions)}, in_flight={self._in_flight})"
