"""The Channel contract (STYLE: bounded channels with a strict contract).

Every blocking test runs the blocked side in a helper thread and synchronises with
Events, never with sleeps; a bounded polling loop only waits for a thread to be
seen blocked in ``stats()``.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest

from nanostream import ChannelStats
from nanostream._channel import Aborted, Channel

WAIT = 10.0  # generous upper bound for anything that should happen at once


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    """Poll ``predicate`` until true; fail (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


class Worker(threading.Thread):
    """Runs ``fn`` in a thread; keeps its result or exception."""

    def __init__(self, fn) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc

    def finish(self):
        self.join(WAIT)
        assert not self.is_alive(), "thread still blocked"
        return self.result


# -- construction -------------------------------------------------------------------

@pytest.mark.parametrize(("capacity", "exc", "message"), [
    (0, ValueError, "capacity must be >= 1, got 0"),
    (-5, ValueError, "capacity must be >= 1, got -5"),
    (1.5, TypeError, "capacity must be an int, got float"),
    ("8", TypeError, "capacity must be an int, got str"),
    (True, TypeError, "capacity must be an int, got bool"),
    (None, TypeError, "capacity must be an int, got NoneType"),
])
def test_capacity_is_validated_with_an_exact_message(capacity, exc, message):
    with pytest.raises(exc) as info:
        Channel(capacity)
    assert str(info.value) == message


def test_producers_are_validated():
    with pytest.raises(ValueError) as info:
        Channel(4, producers=0)
    assert str(info.value) == "producers must be >= 1, got 0"


def test_capacity_one_is_valid_and_default_is_1024():
    assert Channel(1).capacity == 1
    assert Channel().capacity == 1024


# -- put / get ---------------------------------------------------------------------

def test_fifo_with_put_and_put_many():
    ch = Channel(10)
    ch.put(1)
    ch.put_many([2, 3])
    ch.put_many([])
    ch.put(4)
    assert len(ch) == 4
    assert ch.get() == [1, 2, 3, 4]


def test_get_limit_takes_at_most_limit_items_in_order():
    ch = Channel(10)
    ch.put_many(list(range(7)))
    assert ch.get(3) == [0, 1, 2]
    assert ch.get(1) == [3]
    assert ch.get(100) == [4, 5, 6]


def test_get_timeout_returns_empty_list_when_nothing_arrives():
    ch = Channel(2)
    assert ch.get(timeout=0.01) == []
    assert ch.get(5, timeout=0) == []
    ch.put("x")
    assert ch.get(timeout=0.01) == ["x"]


def test_get_timeout_at_end_of_stream_returns_none():
    ch = Channel(2)
    ch.close()
    assert ch.get(timeout=0.01) is None
    assert ch.get() is None


def test_items_queued_before_close_are_delivered_before_the_end():
    ch = Channel(4)
    ch.put_many([1, 2, 3])
    ch.close()
    assert ch.closed
    assert ch.get(2) == [1, 2]
    assert ch.get(2) == [3]
    assert ch.get(2) is None
    assert ch.get(2) is None  # the end is sticky


def test_multi_producer_stream_ends_after_every_producer_closed():
    ch = Channel(8, producers=3)
    ch.put(1)
    ch.close()
    ch.put(2)
    ch.close()
    assert not ch.closed
    assert ch.get() == [1, 2]
    assert ch.get(timeout=0.01) == []  # one producer is still open: not the end
    ch.put(3)
    ch.close()
    assert ch.closed
    assert ch.get() == [3]
    assert ch.get() is None


def test_consumer_blocked_in_get_wakes_for_an_item_and_for_the_end():
    ch = Channel(4, producers=2)
    first = Worker(ch.get)
    first.start()
    wait_until(lambda: ch.stats().waiting_consumers == 1, "the consumer to block")
    ch.put("a")
    assert first.finish() == ["a"]

    second = Worker(ch.get)
    second.start()
    wait_until(lambda: ch.stats().waiting_consumers == 1, "the consumer to block again")
    ch.close()
    ch.close()
    assert second.finish() is None
    assert second.error is None


def test_last_close_wakes_a_consumer_waiting_with_a_timeout():
    ch = Channel(4)
    w = Worker(lambda: ch.get(timeout=WAIT * 3))
    w.start()
    wait_until(lambda: ch.stats().waiting_consumers == 1, "the consumer to block")
    t0 = time.monotonic()
    ch.close()
    assert w.finish() is None
    assert time.monotonic() - t0 < WAIT


def test_producer_blocks_while_full_and_resumes_when_consumer_takes():
    ch = Channel(2)
    ch.put_many([1, 2])
    w = Worker(lambda: ch.put(3))
    w.start()
    wait_until(lambda: ch.stats().waiting_producers == 1, "the producer to block")
    assert len(ch) == 2  # nothing got in beyond the capacity
    assert ch.get(1) == [1]
    w.finish()
    assert w.error is None
    assert ch.get() == [2, 3]


def test_put_many_that_does_not_fit_waits_for_room_then_goes_in_whole():
    ch = Channel(4)
    ch.put_many([1, 2, 3])
    w = Worker(lambda: ch.put_many([4, 5, 6]))
    w.start()
    wait_until(lambda: ch.stats().waiting_producers == 1, "the producer to block")
    assert ch.get(1) == [1]          # 2 queued + 3 = 5 > 4: still no room
    assert ch.stats().waiting_producers == 1
    assert len(ch) == 2
    assert ch.get(1) == [2]          # 1 queued + 3 = 4: fits
    w.finish()
    assert ch.get() == [3, 4, 5, 6]


def test_a_batch_longer_than_the_capacity_is_accepted_once_empty():
    ch = Channel(2)
    ch.put_many(list(range(5)))  # empty channel: accepted whole, no deadlock
    assert len(ch) == 5
    assert ch.stats().fill == 2.5
    w = Worker(lambda: ch.put_many([10, 11, 12]))
    w.start()
    wait_until(lambda: ch.stats().waiting_producers == 1, "the producer to block")
    assert ch.get() == [0, 1, 2, 3, 4]
    w.finish()
    assert ch.get() == [10, 11, 12]


def test_concurrent_producers_and_consumer_lose_and_duplicate_nothing():
    ch = Channel(3, producers=4)
    per = 2000

    def produce(k):
        def body():
            for i in range(per):
                if i % 3:
                    ch.put((k, i))
                else:
                    ch.put_many([(k, i)])
            ch.close()
        return body

    producers = [Worker(produce(k)) for k in range(4)]
    for p in producers:
        p.start()
    got = []
    while True:
        batch = ch.get(5, timeout=WAIT)
        assert batch != [], "the consumer starved although producers were running"
        if batch is None:
            break
        assert len(batch) <= 5
        got.extend(batch)
    for p in producers:
        p.finish()
    assert sorted(got) == [(k, i) for k in range(4) for i in range(per)]
    for k in range(4):  # FIFO per producer
        assert [i for kk, i in got if kk == k] == list(range(per))


# -- lost wake-ups: deterministic interleavings -------------------------------------

class _SpyLock:
    """Wraps the channel's lock (its conditions keep the real one) to notice another
    thread having to wait for it."""

    def __init__(self, lock, contended: threading.Event) -> None:
        self.lock = lock
        self.contended = contended

    def __enter__(self):
        if not self.lock.acquire(False):
            self.contended.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def locked(self) -> bool:
        return self.lock.locked()


class _PausingDeque(deque):
    """A deque that, the first time ``len`` is taken by ``thread`` under the channel
    lock (the "check" half of check-then-sleep), reports the length it saw and then
    holds that thread until ``go``: until the other side has finished its lock-free
    call, or has to wait for the lock. That is exactly the interleaving in which a
    wake-up can get lost."""

    def __init__(self, lock) -> None:
        super().__init__()
        self.lock = lock
        self.thread: threading.Thread | None = None
        self.paused = threading.Event()
        self.go = threading.Event()
        self.fired = False

    def __len__(self) -> int:
        n = super().__len__()
        if (not self.fired and threading.current_thread() is self.thread
                and self.lock.locked()):
            self.fired = True
            self.paused.set()
            self.go.wait(WAIT)
        return n


def _pausing_channel(capacity: int) -> tuple[Channel, _PausingDeque]:
    ch = Channel(capacity)
    dq = _PausingDeque(ch._lock)
    ch._dq = dq
    ch._lock = _SpyLock(ch._lock, dq.go)  # type: ignore[assignment]
    return ch, dq


def _finish_or_free(ch: Channel, w: Worker) -> bool:
    w.join(WAIT)
    blocked = w.is_alive()
    if blocked:
        ch.abort()  # free the thread before failing
        w.join(WAIT)
    return blocked


def test_no_lost_wakeup_when_the_consumer_empties_a_full_channel_during_a_blocking_put():
    ch, dq = _pausing_channel(1)
    dq.append("old")
    w = Worker(lambda: ch.put("new"))
    dq.thread = w
    w.start()
    assert dq.paused.wait(WAIT)  # the producer saw the channel full, under the lock
    assert ch.get() == ["old"]   # consumer's lock-free fast path empties it meanwhile
    dq.go.set()
    assert not _finish_or_free(ch, w), \
        "producer slept forever on a channel with room (lost wake-up)"
    assert ch.get() == ["new"]


def test_no_lost_wakeup_when_a_producer_appends_during_a_blocking_get():
    ch, dq = _pausing_channel(4)
    w = Worker(ch.get)
    dq.thread = w
    w.start()
    assert dq.paused.wait(WAIT)  # the consumer saw the channel empty, under the lock
    ch.put("x")                  # producer's lock-free fast path appends meanwhile
    dq.go.set()
    assert not _finish_or_free(ch, w), \
        "consumer slept forever on a channel holding an item (lost wake-up)"
    assert w.result == ["x"]


# -- abort ----------------------------------------------------------------------------

def test_abort_wakes_blocked_producer_and_consumer_with_aborted():
    full = Channel(1)
    full.put(0)
    producer = Worker(lambda: full.put(1))
    empty = Channel(1)
    consumer = Worker(empty.get)
    producer.start()
    consumer.start()
    wait_until(lambda: full.stats().waiting_producers == 1, "the producer to block")
    wait_until(lambda: empty.stats().waiting_consumers == 1, "the consumer to block")
    full.abort()
    empty.abort()
    producer.finish()
    consumer.finish()
    assert isinstance(producer.error, Aborted)
    assert isinstance(consumer.error, Aborted)


def test_after_abort_every_put_and_get_raises():
    ch = Channel(4)
    ch.put_many([1, 2])
    ch.abort()
    with pytest.raises(Aborted):
        ch.get()
    with pytest.raises(Aborted):
        ch.get(timeout=0.01)
    with pytest.raises(Aborted):
        ch.put(3)
    with pytest.raises(Aborted):
        ch.put_many([3])
    assert "aborted" in repr(ch)


def test_abort_wakes_a_consumer_waiting_with_a_timeout():
    ch = Channel(1)
    w = Worker(lambda: ch.get(timeout=WAIT * 3))
    w.start()
    wait_until(lambda: ch.stats().waiting_consumers == 1, "the consumer to block")
    ch.abort()
    w.finish()
    assert isinstance(w.error, Aborted)


# -- discard ----------------------------------------------------------------------------

def test_discard_drops_queued_and_later_items_through_on_discard():
    dropped = []
    ch = Channel(4, on_discard=dropped.append)
    ch.put_many([1, 2, 3])
    ch.discard()
    assert ch.discarding
    assert len(ch) == 0
    assert dropped == [[1, 2, 3]]
    ch.put(4)
    ch.put_many([5, 6])
    assert dropped == [[1, 2, 3], [4], [5, 6]]
    assert len(ch) == 0
    ch.close()
    assert ch.get() is None


def test_discard_on_an_empty_channel_calls_nothing():
    dropped = []
    ch = Channel(4, on_discard=dropped.append)
    ch.discard()
    assert dropped == []
    ch.discard()  # idempotent
    assert dropped == []


def test_discard_wakes_a_blocked_producer_whose_items_are_dropped():
    dropped = []
    ch = Channel(1, on_discard=dropped.append)
    ch.put("queued")
    w = Worker(lambda: ch.put_many(["a", "b"]))
    w.start()
    wait_until(lambda: ch.stats().waiting_producers == 1, "the producer to block")
    ch.discard()
    w.finish()
    assert w.error is None
    assert dropped == [["queued"], ["a", "b"]]


def test_discard_without_callback_just_drops():
    ch = Channel(2)
    ch.put_many([1, 2])
    ch.discard()
    ch.put(3)
    assert len(ch) == 0


# -- stats ----------------------------------------------------------------------------

def test_stats_snapshot_counts_queue_and_waiters():
    ch = Channel(3, name="q")
    assert ch.stats() == ChannelStats(queued=0, capacity=3, waiting_producers=0,
                                      waiting_consumers=0)
    assert ch.stats().fill == 0.0
    ch.put_many([1, 2])
    s = ch.stats()
    assert (s.queued, s.capacity) == (2, 3)
    assert s.fill == pytest.approx(2 / 3)
    ch.put(3)
    producers = [Worker(lambda i=i: ch.put(i)) for i in (4, 5)]
    for p in producers:
        p.start()
    wait_until(lambda: ch.stats().waiting_producers == 2, "two producers to block")
    assert ch.stats().queued == 3
    assert ch.stats().fill == 1.0
    got = []
    while len(got) < 5:
        got.extend(ch.get(timeout=WAIT))
    for p in producers:
        p.finish()
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert ch.stats().waiting_producers == 0

    consumer = Worker(ch.get)
    consumer.start()
    wait_until(lambda: ch.stats().waiting_consumers == 1, "the consumer to block")
    assert ch.stats().queued == 0
    ch.close()
    assert consumer.finish() is None
    assert ch.stats().waiting_consumers == 0


def test_channel_stats_is_frozen_and_fill_handles_zero_capacity():
    s = ChannelStats(queued=1, capacity=0, waiting_producers=0, waiting_consumers=0)
    assert s.fill == 0.0
    with pytest.raises(AttributeError):
        s.queued = 2  # type: ignore[misc]


def test_repr_names_channel_and_state():
    ch = Channel(4, name="parse")
    ch.put(1)
    assert repr(ch) == "<Channel 'parse' 1/4 open>"
    ch.close()
    assert repr(ch) == "<Channel 'parse' 1/4 closed>"
