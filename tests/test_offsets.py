"""OffsetTracker: commit positions for at-least-once delivery (nanostream/_offsets.py)."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanostream._offsets import OffsetTracker


def track_all(tracker: OffsetTracker, topic: str, partition: int, offsets) -> None:
    for offset in offsets:
        tracker.track(topic, partition, offset)


def test_in_order_done_moves_the_position_one_past_each_offset():
    tracker = OffsetTracker()
    track_all(tracker, "t", 0, [0, 1, 2])
    assert tracker.committable() == {}
    tracker.done("t", 0, 0)
    assert tracker.committable() == {("t", 0): 1}
    tracker.done("t", 0, 1)
    tracker.done("t", 0, 2)
    assert tracker.committable() == {("t", 0): 3}
    assert tracker.in_flight() == 0


def test_position_waits_for_the_oldest_pending_offset():
    tracker = OffsetTracker()
    track_all(tracker, "t", 0, [5, 6, 7, 8])
    tracker.done("t", 0, 8)
    tracker.done("t", 0, 6)
    assert tracker.committable() == {}
    tracker.done("t", 0, 5)
    assert tracker.committable() == {("t", 0): 7}
    tracker.done("t", 0, 7)
    assert tracker.committable() == {("t", 0): 9}


def test_gaps_commit_one_past_the_last_done_offset_not_the_next_existing_one():
    tracker = OffsetTracker()
    track_all(tracker, "t", 0, [3, 10, 11, 40])
    tracker.done("t", 0, 3)
    assert tracker.committable() == {("t", 0): 4}
    tracker.done("t", 0, 11)
    tracker.done("t", 0, 10)
    assert tracker.committable() == {("t", 0): 12}
    tracker.done("t", 0, 40)
    assert tracker.committable() == {("t", 0): 41}


def test_committable_lists_only_partitions_that_moved_since_mark_committed():
    tracker = OffsetTracker()
    track_all(tracker, "a", 0, [0, 1])
    track_all(tracker, "a", 1, [0, 1])
    track_all(tracker, "b", 0, [7])
    for key in [("a", 0, 0), ("a", 1, 0), ("b", 0, 7)]:
        tracker.done(*key)
    positions = tracker.committable()
    assert positions == {("a", 0): 1, ("a", 1): 1, ("b", 0): 8}
    tracker.mark_committed(positions)
    assert tracker.committable() == {}
    tracker.done("a", 1, 1)
    assert tracker.committable() == {("a", 1): 2}


def test_a_failed_commit_is_offered_again_with_the_newer_position():
    tracker = OffsetTracker()
    track_all(tracker, "t", 0, [0, 1])
    tracker.done("t", 0, 0)
    assert tracker.committable() == {("t", 0): 1}  # commit fails: not marked
    tracker.done("t", 0, 1)
    assert tracker.committable() == {("t", 0): 2}


def test_mark_committed_never_moves_back_and_ignores_unknown_partitions():
    tracker = OffsetTracker()
    track_all(tracker, "t", 0, [0, 1])
    tracker.done("t", 0, 0)
    tracker.done("t", 0, 1)
    tracker.mark_committed({("t", 0): 2, ("other", 3): 99})
    tracker.mark_committed({("t", 0): 1})  # a late, older commit result
    assert tracker.committable() == {}
    assert tracker.partitions() == [("t", 0)]


def test_duplicate_and_stale_done_calls_are_no_ops():
    tracker = OffsetTracker()
    track_all(tracker, "t", 0, [0, 1, 2])
    tracker.done("t", 0, 1)
    tracker.done("t", 0, 1)
    assert tracker.in_flight() == 2
    tracker.done("t", 0, 0)
    tracker.done("t", 0, 0)  # already released
    assert tracker.committable() == {("t", 0): 2}
    assert tracker.in_flight() == 1
    tracker.done("nope", 9, 0)  # never tracked partition
    assert tracker.in_flight() == 1


def test_offsets_must_be_tracked_in_increasing_order():
    tracker = OffsetTracker()
    tracker.track("t", 0, 5)
    with pytest.raises(ValueError, match=r"increasing order, got 5 after 5"):
        tracker.track("t", 0, 5)
    with pytest.raises(ValueError, match=r"got 4 after 5"):
        tracker.track("t", 0, 4)
    tracker.track("t", 1, 0)  # other partitions are independent


def test_done_for_an_offset_newer_than_any_tracked_is_an_error():
    tracker = OffsetTracker()
    tracker.track("t", 0, 5)
    with pytest.raises(ValueError, match=r"offset 6 of \('t', 0\) is done but was never tracked"):
        tracker.done("t", 0, 6)
    assert tracker.in_flight() == 1


def test_revoke_forgets_partitions_and_returns_their_uncommitted_positions():
    tracker = OffsetTracker()
    track_all(tracker, "t", 0, [0, 1, 2])
    track_all(tracker, "t", 1, [0, 1])
    track_all(tracker, "t", 2, [0])
    tracker.done("t", 0, 0)
    tracker.done("t", 1, 0)
    tracker.mark_committed({("t", 1): 1})
    final = tracker.revoke([("t", 0), ("t", 1), ("t", 9)])
    assert final == {("t", 0): 1}  # ("t", 1) was committed already, ("t", 9) unknown
    assert tracker.partitions() == [("t", 2)]
    assert tracker.in_flight() == 1
    tracker.done("t", 0, 1)  # a message of a revoked partition finishes: ignored
    assert tracker.committable() == {}
    assert tracker.in_flight() == 1


def test_reassigned_partition_starts_fresh_and_ignores_the_old_generation():
    tracker = OffsetTracker()
    old = tracker.track("t", 0, 10)
    tracker.revoke([("t", 0)])
    new = tracker.track("t", 0, 4)  # re-delivered from the committed position
    assert new != old
    tracker.done("t", 0, 4, old)  # the pre-revoke message of the same partition
    assert tracker.committable() == {}
    assert tracker.in_flight() == 1
    tracker.done("t", 0, 4, new)
    assert tracker.committable() == {("t", 0): 5}


def test_done_from_many_threads_in_any_order():
    tracker = OffsetTracker()
    offsets = {p: list(range(0, 6000, 2)) for p in range(3)}  # gaps of one
    for p, offs in offsets.items():
        track_all(tracker, "t", p, offs)
    work = [(p, o) for p, offs in offsets.items() for o in offs]
    random.Random(7).shuffle(work)
    n_threads = 4
    barrier = threading.Barrier(n_threads)

    def finish(share):
        barrier.wait()
        for p, o in share:
            tracker.done("t", p, o)

    threads = [
        threading.Thread(target=finish, args=(work[i::n_threads],)) for i in range(n_threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tracker.in_flight() == 0
    assert tracker.committable() == {("t", p): 5999 for p in range(3)}


def test_repr_counts_partitions_and_messages_in_flight():
    tracker = OffsetTracker()
    track_all(tracker, "t", 0, [1, 2])
    assert repr(tracker) == "OffsetTracker(partitions=1, in_flight=2)"


# --- property: random gapped offsets, random interleavings of track / done / commit ---

partition_offsets = st.lists(
    st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=25, unique=True).map(
        sorted
    ),
    min_size=1,
    max_size=4,
)


def expected_position(tracked: list[int], done: set[int]) -> int | None:
    """1 + the highest tracked offset that is done with every tracked offset before it."""
    position = None
    for offset in tracked:
        if offset not in done:
            break
        position = offset + 1
    return position


@settings(max_examples=300, deadline=None)
@given(offsets=partition_offsets, data=st.data())
def test_committable_never_passes_an_offset_that_is_not_done(offsets, data):
    tracker = OffsetTracker()
    keys = [("topic", p) for p in range(len(offsets))]
    to_track = {key: list(offs) for key, offs in zip(keys, offsets, strict=True)}
    tracked = {key: [] for key in keys}
    done = {key: set() for key in keys}
    committed: dict = {}

    def check():
        expected = {}
        for key in keys:
            position = expected_position(tracked[key], done[key])
            if position is not None and position != committed.get(key):
                expected[key] = position
        positions = tracker.committable()
        assert positions == expected
        for key, position in positions.items():
            assert all(o in done[key] for o in tracked[key] if o < position)
        assert tracker.in_flight() == sum(len(tracked[k]) - len(done[k]) for k in keys)
        return positions

    while True:
        actions = [("track", key) for key in keys if to_track[key]]
        actions += [("done", key, o) for key in keys for o in tracked[key] if o not in done[key]]
        if not actions:
            break
        actions.append(("commit",))
        action = data.draw(st.sampled_from(actions))
        if action[0] == "track":
            key = action[1]
            offset = to_track[key].pop(0)
            tracker.track(*key, offset)
            tracked[key].append(offset)
        elif action[0] == "done":
            _, key, offset = action
            tracker.done(*key, offset)
            done[key].add(offset)
        else:
            positions = check()
            tracker.mark_committed(positions)
            committed.update(positions)
        check()

    # everything tracked and done: every partition can commit past its last offset
    final = {key: offsets[i][-1] + 1 for i, key in enumerate(keys)}
    assert {**committed, **tracker.committable()} == final
    assert tracker.in_flight() == 0
