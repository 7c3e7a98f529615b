"""Windows: tumbling / sliding / session, by count, processing time and event time.

Time runs on a virtual clock. Exact semantics are checked by calling the window
stage directly on an iterator (a stage called with its input runs its function),
with ``TICK`` markers standing for "no item arrived for a while"; a few pipeline
tests then check the runtime wiring (ticks, end of stream, stop(drain=True)) with
Event handshakes, never sleeps.
"""

from __future__ import annotations

import logging
import math
import threading
from itertools import groupby

import pytest
import toolz
from hypothesis import given, settings
from hypothesis import strategies as st

import nanostream as ns
from nanostream import Window
from nanostream._runtime import TICK


class VirtualClock:
    """A clock that only moves when told to; every read is counted and announced."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t
        self.reads = 0
        self.cond = threading.Condition()

    def __call__(self) -> float:
        with self.cond:
            self.reads += 1
            self.cond.notify_all()
            return self.t

    def wait_for(self, predicate, timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "timed out waiting on the clock"


def wait_read_after_pull(run, stage: str, clock: VirtualClock) -> None:
    """Block until ``stage`` took its (single) item and read the clock for it.

    Once the stage took the item, the first clock read that starts afterwards is
    the read for that item or a later idle tick; either way the item is timed.
    """
    clock.wait_for(lambda: run.stats()[stage].items_in >= 1)
    r0 = clock.reads
    clock.wait_for(lambda: clock.reads > r0)


def drive(stage, script, clock=None):
    """Run ``stage`` directly (in this thread) over a scripted input.

    ``script`` is a list of ``("at", t)`` (set the clock), ``("tick",)`` and
    ``("item", x)`` steps. Returns ``(outputs, pulled)`` where ``pulled[i]`` is how
    many items had been taken when output ``i`` came out.
    """
    count = [0]

    def feed():
        for step in script:
            if step[0] == "at":
                clock.t = step[1]
            elif step[0] == "tick":
                yield TICK
            else:
                count[0] += 1
                yield step[1]

    outs, pulled = [], []
    for w in stage(feed()):
        outs.append(w)
        pulled.append(count[0])
    return outs, pulled


def values(ws):
    return [w.value for w in ws]


# -- count windows ----------------------------------------------------------------------

def test_tumbling_count_examples():
    assert list(range(7) | ns.tumbling(size=3)) == [
        Window(None, 0, 3, [0, 1, 2]), Window(None, 3, 6, [3, 4, 5]), Window(None, 6, 7, [6])]
    assert values(range(7) | ns.tumbling(3, agg=sum)) == [3, 12, 6]
    assert list([] | ns.tumbling(size=3)) == []
    assert list([5] | ns.tumbling(size=3)) == [Window(None, 0, 1, [5])]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers()), st.integers(1, 6))
def test_tumbling_count_matches_partition_all(xs, n):
    got = ns.tumbling(size=n)(xs)
    assert [tuple(w.value) for w in got] == list(toolz.partition_all(n, xs))
    got = list(ns.tumbling(size=n, agg=sum)(xs))
    assert [w.value for w in got] == [sum(p) for p in toolz.partition_all(n, xs)]
    sizes = [len(p) for p in toolz.partition_all(n, xs)]
    assert [w.end - w.start for w in got] == sizes


def ref_sliding(xs, size, step):
    """Full windows [k*step, k*step+size); then, at the end, the first window not
    emitted if it holds items that no emitted window holds."""
    out, k = [], 0
    while k * step + size <= len(xs):
        out.append((k * step, xs[k * step:k * step + size]))
        k += 1
    covered = (k - 1) * step + size if k else 0
    if k * step < len(xs) and len(xs) > covered:
        out.append((k * step, xs[k * step:]))
    return out


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(), max_size=30), st.integers(1, 6), st.data())
def test_sliding_count_matches_reference(xs, size, data):
    step = data.draw(st.integers(1, size))
    got = list(ns.sliding(size=size, step=step)(xs))
    assert [(w.start, w.value) for w in got] == ref_sliding(xs, size, step)
    assert all(w.end == w.start + len(w.value) for w in got)
    if step == 1 and len(xs) >= size:
        assert [tuple(w.value) for w in got] == list(toolz.sliding_window(size, xs))
    if step == size:
        assert [w.value for w in got] == [w.value for w in ns.tumbling(size=size)(xs)]


def test_sliding_count_edges():
    assert values(range(5) | ns.sliding(size=3)) == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert values(range(2) | ns.sliding(size=3)) == [[0, 1]]  # shorter than a window
    assert values(range(6) | ns.sliding(size=3, step=2)) == [[0, 1, 2], [2, 3, 4], [4, 5]]
    assert values(range(5) | ns.sliding(size=3, step=2)) == [[0, 1, 2], [2, 3, 4]]
    assert list([] | ns.sliding(size=3)) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers())), st.integers(1, 4),
       st.data())
def test_keyed_count_windows_are_per_key(pairs, size, data):
    step = data.draw(st.integers(1, size))
    got = list(ns.sliding(size=size, step=step, key=lambda p: p[0])(pairs))
    for k, group in toolz.groupby(lambda p: p[0], pairs).items():
        mine = [(w.start, w.value) for w in got if w.key == k]
        assert mine == ref_sliding(group, size, step)
    # windows come out as soon as they fill: in the order their last item arrived
    full = [w for w in got if len(w.value) == size]
    index = {id(p): i for i, p in enumerate(pairs)}
    assert [index[id(w.value[-1])] for w in full] == sorted(index[id(w.value[-1])] for w in full)


def test_keyed_running_aggregate_by_dict_key():
    rows = [{"user": u, "n": n} for u, n in ["a1", "b2", "a3", "a4", "b5"]]
    got = list(rows | ns.tumbling(size=2, key="user", agg=lambda rs: sum(int(r["n"]) for r in rs)))
    assert got == [Window("a", 0, 2, 4), Window("b", 0, 2, 7), Window("a", 2, 3, 4)]


def test_count_window_is_emitted_right_after_its_last_item():
    outs, pulled = drive(ns.tumbling(size=2), [("item", i) for i in range(5)])
    assert pulled == [2, 4, 5]
    outs, pulled = drive(ns.sliding(size=3), [("item", i) for i in range(5)])
    assert pulled == [3, 4, 5]


# -- processing time (virtual clock) ------------------------------------------------------

def test_tumbling_processing_time_closes_on_items_and_ticks():
    clock = VirtualClock()
    script = [("at", 1), ("item", "a"), ("at", 4), ("item", "b"),
              ("at", 12), ("item", "c"),          # closes [0, 10) on this item
              ("at", 19), ("tick",), ("at", 20), ("tick",),  # closes [10, 20) on a tick
              ("at", 35), ("item", "d")]         # [30, 40) is flushed at end of stream
    outs, pulled = drive(ns.tumbling(seconds=10, clock=clock), script, clock)
    assert outs == [Window(None, 0, 10, ["a", "b"]), Window(None, 10, 20, ["c"]),
                    Window(None, 30, 40, ["d"])]
    assert pulled == [3, 3, 4]


def test_sliding_processing_time():
    clock = VirtualClock()
    script = [("at", 1), ("item", "a"), ("at", 6), ("item", "b"), ("at", 11), ("tick",),
              ("at", 16), ("tick",)]
    outs, _ = drive(ns.sliding(seconds=10, step=5, clock=clock), script, clock)
    assert outs == [Window(None, -5, 5, ["a"]), Window(None, 0, 10, ["a", "b"]),
                    Window(None, 5, 15, ["b"])]


def test_session_processing_time():
    clock = VirtualClock()
    script = [("at", 0), ("item", 1), ("at", 2), ("item", 2), ("at", 6), ("item", 3),
              ("at", 11), ("tick",), ("at", 20), ("item", 4)]
    outs, pulled = drive(ns.session(gap=5, clock=clock), script, clock)
    assert outs == [Window(None, 0, 11, [1, 2, 3]), Window(None, 20, 25, [4])]
    assert pulled == [3, 4]


def test_keyed_processing_time_windows_close_together_in_key_order():
    clock = VirtualClock()
    script = [("at", 1), ("item", "b1"), ("item", "a1"), ("item", "b2"), ("at", 10), ("tick",)]
    outs, _ = drive(ns.tumbling(seconds=10, key=lambda s: s[0], agg=len, clock=clock),
                    script, clock)
    assert outs == [Window("b", 0, 10, 2), Window("a", 0, 10, 1)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), max_size=40),
       st.sampled_from([1, 2, 3, 10]))
def test_processing_time_tumbling_matches_grouping_by_arrival_time(steps, size):
    """Items at non-decreasing virtual times, idle ticks anywhere: every item lands in
    the window of its arrival time, windows come out in time order, and a window
    comes out at the first item or tick at or after its end."""
    clock = VirtualClock()
    script, t, arrivals = [], 0, []
    for i, (dt, tick) in enumerate(steps):
        t += dt
        script.append(("at", t))
        script.append(("tick",) if tick else ("item", i))
        if not tick:
            arrivals.append((i, t))
    outs, pulled = drive(ns.tumbling(seconds=size, clock=clock), script, clock)
    expected = [(k * size, [i for i, _ in g])
                for k, g in groupby(arrivals, key=lambda p: p[1] // size)]
    assert [(w.start, w.value) for w in outs] == expected
    # timing: window [s, e) came out at the first step with time >= e
    times = [s[1] for s in script if s[0] == "at"]
    for w, n in zip(outs, pulled, strict=True):
        first = next((j for j, tt in enumerate(times) if tt >= w.end), None)
        if first is None:
            assert n == len(arrivals)  # flushed at end of stream
        else:
            assert n == sum(1 for s in script[:2 * first + 2] if s[0] == "item")


# -- event time -----------------------------------------------------------------------------

def test_event_time_tumbling_with_lateness():
    late = []
    events = [{"ts": t} for t in (1, 3, 12, 4, 8, 21, 9, 15, 30)]
    w = ns.tumbling(seconds=10, timestamp="ts", lateness=5, on_late=late.append, agg=len)
    outs, pulled = drive(w, [("item", e) for e in events])
    # [0,10) closes once the watermark (max ts - 5) reaches 10: at ts 21
    assert outs == [Window(None, 0, 10, 4), Window(None, 10, 20, 2), Window(None, 20, 30, 1),
                    Window(None, 30, 40, 1)]
    assert pulled == [6, 9, 9, 9]
    assert late == [{"ts": 9}]  # arrived after [0, 10) was emitted


def test_late_items_default_dropped_counted_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="nanostream"):
        outs = list([1, 12, 2, 3, 25] | ns.tumbling(seconds=10, timestamp=lambda t: t, agg=list))
    assert outs == [Window(None, 0, 10, [1]), Window(None, 10, 20, [12]),
                    Window(None, 20, 30, [25])]
    assert "dropped 2 late item(s)" in caplog.text


def test_late_item_raise_policy_names_the_item():
    stage = ns.tumbling(seconds=10, timestamp=lambda t: t, on_late="raise")
    with pytest.raises(ns.StageError, match=r"failed on item 2: ValueError: late item") as ei:
        list([1, 12, 2] | stage)
    assert ei.value.item == 2


def test_sliding_event_time_item_joins_only_open_windows():
    late = []
    w = ns.sliding(seconds=10, step=5, timestamp=lambda t: t, on_late=late.append)
    outs, _ = drive(w, [("item", t) for t in (1, 11, 7, 2)])
    # at ts 11 the watermark is 11: [-5, 5) and [0, 10) are out; 7 still fits [5, 15);
    # 2 fits only windows already out, so it is late
    assert [(o.start, o.value) for o in outs] == [(-5, [1]), (0, [1]), (5, [11, 7]),
                                                  (10, [11])]
    assert late == [2]


def ref_event_tumbling(stamps, size, lateness):
    """The late rule by hand: an item is late if its window's end is at or below the
    watermark (largest earlier timestamp - lateness) when it arrives."""
    wm, windows, late = -math.inf, {}, []
    for i, t in enumerate(stamps):
        k = math.floor(t / size)
        if (k + 1) * size <= wm:
            late.append(i)
        else:
            windows.setdefault(k, []).append(i)
        wm = max(wm, t - lateness)
    return [(k * size, windows[k]) for k in sorted(windows)], late


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(-20, 60), max_size=40), st.sampled_from([1, 5, 10]),
       st.sampled_from([0, 3, 10, 100]))
def test_event_time_tumbling_matches_reference(stamps, size, lateness):
    late = []
    stage = ns.tumbling(seconds=size, timestamp=lambda i: stamps[i], lateness=lateness,
                        on_late=late.append)
    outs, pulled = drive(stage, [("item", i) for i in range(len(stamps))])
    expected, expected_late = ref_event_tumbling(stamps, size, lateness)
    assert [(w.start, w.value) for w in outs] == expected
    assert late == expected_late
    for w, n in zip(outs, pulled, strict=True):  # emitted once the watermark passed its end
        hit = next((j for j in range(len(stamps))
                    if max(stamps[:j + 1]) - lateness >= w.end), None)
        assert n == (len(stamps) if hit is None else hit + 1)


def test_event_time_session_merges_out_of_order_items():
    w = ns.session(gap=7, timestamp=lambda t: t, lateness=100)
    # 5 bridges 1 and 10, then 14 bridges 10 and 20: one session, items in arrival order
    assert list(w([10, 1, 20, 5, 14])) == [Window(None, 1, 27, [10, 1, 20, 5, 14])]
    w = ns.session(gap=5, timestamp=lambda t: t, lateness=100)
    assert values(w([10, 1, 20, 5, 14])) == [[1, 5], [10, 14], [20]]  # 5 -> 10 is a full gap
    assert [(o.start, o.end) for o in w([3, 1])] == [(1, 8)]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 60)), max_size=30),
       st.sampled_from([1, 3, 7]))
def test_event_time_sessions_match_gap_clustering(events, gap):
    """With enough lateness nothing is late: per key, the sessions are the clusters
    of timestamps whose neighbours are closer than ``gap``."""
    stage = ns.session(gap=gap, timestamp=lambda e: e[1], key=lambda e: e[0], lateness=1000)
    outs = list(stage(events))
    for k in "ab":
        mine = [e for e in events if e[0] == k]
        stamps = sorted({t for _, t in mine})
        clusters, cur = [], []
        for t in stamps:
            if cur and t - cur[-1] >= gap:
                clusters.append(cur)
                cur = []
            cur.append(t)
        if cur:
            clusters.append(cur)
        expected = [(c[0], c[-1] + gap, [e for e in mine if c[0] <= e[1] <= c[-1]])
                    for c in clusters]
        assert sorted((w.start, w.end, w.value) for w in outs if w.key == k) == expected


def test_session_lateness_rule():
    late = []
    w = ns.session(gap=5, timestamp=lambda t: t, lateness=2, on_late=late.append)
    outs = list(w([1, 3, 20, 4, 9, 17]))
    # at ts 20 the watermark is 18: session [1, 8) is out, so 4 (which would reopen it) is late;
    # 9 is within 5 of nothing still open and 9 + 5 <= 18 -> late; 17 joins [20, 25)
    assert [(o.start, o.end, o.value) for o in outs] == [(1, 8, [1, 3]), (17, 25, [20, 17])]
    assert late == [4, 9]


def test_datetime_timestamps_get_a_clear_error():
    import datetime
    stage = ns.tumbling(seconds=60, timestamp="at")
    with pytest.raises(ns.StageError, match=r"timestamp must return a number.*\.timestamp\(\)"):
        list([{"at": datetime.datetime(2024, 1, 1)}] | stage)


# -- errors in user functions ---------------------------------------------------------------

def boom(x):
    raise ValueError(f"bad {x}")


def test_key_errors_follow_on_error():
    with pytest.raises(ns.StageError, match="stage 'tumbling' failed on item 1") as ei:
        list([1, 2] | ns.tumbling(size=2, key=boom))
    assert ei.value.item == 1
    assert isinstance(ei.value.__cause__, ValueError)
    assert list([1, 2] | ns.tumbling(size=2, key=boom, on_error="skip")) == []
    seen = []
    got = list([1, 2, 3] | ns.tumbling(size=2, key=lambda x: 1 / (x - 2), agg=len,
                                      on_error=lambda item, exc: seen.append(item)))
    assert got == [Window(-1.0, 0, 1, 1), Window(1.0, 0, 1, 1)]
    assert seen == [2]


def test_agg_error_names_the_window():
    with pytest.raises(ns.StageError, match=r"failed on item Window\(key=None, start=0"):
        list([1, "x"] | ns.tumbling(size=2, agg=sum))
    assert list([1, "x", 2] | ns.tumbling(size=2, agg=sum, on_error="skip")) == [
        Window(None, 2, 3, 2)]


def test_timestamp_error_names_the_item():
    with pytest.raises(ns.StageError, match=r"failed on item \{\}: KeyError"):
        list([{}] | ns.tumbling(seconds=1, timestamp="ts"))


# -- bad arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "exc", "message"), [
    (lambda: ns.tumbling(), TypeError, "needs exactly one of size= .* or seconds=.*got neither"),
    (lambda: ns.tumbling(size=3, seconds=5), TypeError, "got both"),
    (lambda: ns.tumbling(size=0), ValueError, r"tumbling size must be >= 1, got 0"),
    (lambda: ns.tumbling(size=2.5), TypeError, "tumbling size must be an int, got float 2.5"),
    (lambda: ns.tumbling(seconds=0), ValueError, r"tumbling seconds must be a finite number "
                                                 r"of seconds > 0, got 0"),
    (lambda: ns.tumbling(seconds="5"), TypeError, "seconds must be a number of seconds"),
    (lambda: ns.tumbling(size=3, timestamp="ts"), ValueError,
     r"tumbling\(size=...\) counts items, so timestamp= does not apply"),
    (lambda: ns.tumbling(size=3, clock=lambda: 0), ValueError, "so clock= does not apply"),
    (lambda: ns.tumbling(seconds=5, lateness=2), ValueError,
     "lateness= applies to event-time windows only"),
    (lambda: ns.tumbling(seconds=5, on_late=print), ValueError,
     "on_late= applies to event-time windows only"),
    (lambda: ns.tumbling(seconds=5, timestamp="ts", lateness=-1), ValueError,
     "lateness must be a finite number of seconds >= 0, got -1"),
    (lambda: ns.tumbling(seconds=5, timestamp="ts", clock=lambda: 0), ValueError,
     "clock= applies to processing-time windows"),
    (lambda: ns.tumbling(seconds=5, timestamp="ts", on_late="keep"), ValueError,
     "on_late must be 'drop', 'raise' or a callable"),
    (lambda: ns.tumbling(size=3, key=1.5), TypeError, "tumbling key must be a function"),
    (lambda: ns.tumbling(size=3, agg=3), TypeError, "tumbling agg must be callable, got int 3"),
    (lambda: ns.tumbling(size=3, workers=2), ValueError,
     "keeps state across items, so it runs in one worker; option 'workers' does not apply"),
    (lambda: ns.tumbling(size=3, sise=3), TypeError, "did you mean 'size'"),
    (lambda: ns.sliding(seconds=60), TypeError, r"needs step=\.\.\."),
    (lambda: ns.sliding(size=3, step=4), ValueError, "step must be <= size"),
    (lambda: ns.sliding(size=3, step=0), ValueError, "sliding step must be >= 1, got 0"),
    (lambda: ns.sliding(seconds=5, step=6), ValueError, "step must be <= seconds"),
    (lambda: ns.session(gap=0), ValueError, "session gap must be a finite number of seconds"),
    (lambda: ns.session(gap=5, lateness=1), ValueError, "lateness= applies to event-time"),
])
def test_bad_window_arguments(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


def test_repr_shows_what_was_set():
    assert repr(ns.tumbling(size=3)) == "<transform 'tumbling'(size=3) stream=True>"
    assert repr(ns.sliding(seconds=60, step=10, name="m")) == \
        "<transform 'm'(seconds=60, step=10) stream=True>"


# -- in a running pipeline ----------------------------------------------------------------------

def test_processing_time_window_closes_on_an_idle_tick_in_a_pipeline():
    clock = VirtualClock(1.0)
    release, got = threading.Event(), threading.Event()
    out = []

    @ns.source
    def one_then_wait():
        yield "a"
        assert release.wait(10)

    def collect(w):
        out.append(w)
        got.set()

    p = one_then_wait() | ns.tumbling(seconds=10, clock=clock) | ns.sink(collect)
    with p.start() as run:
        wait_read_after_pull(run, "tumbling", clock)
        clock.t = 10.0  # no item comes: only an idle tick can close [0, 10)
        assert got.wait(10)
        release.set()
        assert run.join(10)
    assert out == [Window(None, 0, 10, ["a"])]


def test_session_closes_on_an_idle_tick_in_a_pipeline():
    clock = VirtualClock(0.0)
    release, got = threading.Event(), threading.Event()
    out = []

    @ns.source
    def one_then_wait():
        yield "a"
        assert release.wait(10)

    p = one_then_wait() | ns.session(gap=3, clock=clock) | ns.sink(
        lambda w: (out.append(w), got.set()))
    with p.start() as run:
        wait_read_after_pull(run, "session", clock)
        clock.t = 3.0
        assert got.wait(10)
        release.set()
    assert out == [Window(None, 0.0, 3.0, ["a"])]


def test_open_windows_are_flushed_on_stop_drain():
    clock = VirtualClock()
    started, stopped = threading.Event(), threading.Event()
    out = []

    @ns.source(name="endless")
    def endless():
        i = 0
        try:
            while True:
                yield i
                i += 1
                if i == 5:
                    started.set()
        finally:
            stopped.set()

    p = endless() | ns.tumbling(seconds=60, clock=clock, agg=len) | ns.sink(out.append)
    run = p.start()
    assert started.wait(10)
    run.stop(drain=True)
    run.join(10)
    assert stopped.is_set()
    n = run.stats()["tumbling"].items_in
    assert n >= 5
    assert out == [Window(None, 0, 60, n)]


def test_windows_release_tracked_items_only_after_their_window_is_handled():
    done, handled = [], []
    lock = threading.Lock()

    @ns.source(track=True)
    def tracked():
        for i in range(10):
            yield i, (lambda i=i: done.append(i))

    def store(w):
        with lock:
            assert not set(w.value) & set(done), "an item was acknowledged before its window"
            handled.append(w.value)

    (tracked() | ns.tumbling(size=3) | ns.sink(store)).run()
    assert handled == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert sorted(done) == list(range(10))


def test_keyed_windows_release_items_only_after_their_own_window():
    done, early = [], []
    a_handled = threading.Event()

    @ns.source(track=True)
    def tracked():
        for item in ["a1", "b1", "a2"]:
            yield item, (lambda item=item: done.append(item))
        assert a_handled.wait(10)  # window "a" reaches the sink before "b2" is sent
        yield "b2", (lambda: done.append("b2"))

    def store(w):
        early.extend(sorted(set(w.value) & set(done)))
        if w.key == "a":
            a_handled.set()

    (tracked() | ns.tumbling(size=2, key=lambda s: s[0]) | ns.sink(store)).run()
    assert sorted(done) == ["a1", "a2", "b1", "b2"]
    assert early == []


# -- completion tracking: each item acknowledged after every window holding it --------------
#
# The tracked source below sends some items, then waits until a given window has been
# handled before sending the rest. A sink handles its batch before acknowledging it,
# so an item acknowledged too early (with an earlier window instead of its own) is
# seen as acknowledged when its own window reaches the sink.

class Acks:
    """Acknowledgements of a tracked source, and the sink that checks them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: list = []
        self.early: list = []
        self.handled: list = []
        self.events: dict = {}

    def on_done(self, item):
        def done():
            with self.lock:
                self.done.append(item)
            self.events.setdefault(item, threading.Event()).set()
        return done

    def acked(self, item) -> threading.Event:
        with self.lock:
            return self.events.setdefault(item, threading.Event())

    def source(self, script):
        """``script``: items to send, and ``Event``s to wait for (at most 10 s) in between."""
        @ns.source(track=True, name="tracked")
        def tracked():
            for step in script:
                if isinstance(step, threading.Event):
                    assert step.wait(10), "timed out in the tracked source"
                else:
                    self.acked(step)
                    yield step, self.on_done(step)
        return tracked()

    def sink(self, after=None):
        """Records, per window, its members already acknowledged; calls ``after(w)``."""
        def store(w):
            with self.lock:
                self.early.extend(x for x in w.value if x in self.done)
                self.handled.append(w)
            if after is not None:
                after(w)
        return ns.sink(store)


def test_sliding_count_window_item_is_acknowledged_after_both_its_windows():
    acks = Acks()
    first = threading.Event()
    # sliding(size=2): windows [0, 1] and [1, 2]; item 1 is in both
    p = (acks.source([0, 1, first, 2]) | ns.sliding(size=2)
         | acks.sink(lambda w: w.start == 0 and first.set()))
    p.run()
    assert [w.value for w in acks.handled] == [[0, 1], [1, 2]]
    assert acks.early == []
    assert sorted(acks.done) == [0, 1, 2]


def test_keyed_sliding_count_windows_track_per_key():
    acks = Acks()
    a_out = threading.Event()
    p = (acks.source(["a1", "b1", "a2", "b2", "a3", a_out, "b3"])
         | ns.sliding(size=2, key=lambda s: s[0])
         | acks.sink(lambda w: w.value == ["a2", "a3"] and a_out.set()))
    p.run()
    assert [w.value for w in acks.handled] == [["a1", "a2"], ["b1", "b2"], ["a2", "a3"],
                                               ["b2", "b3"]]
    assert acks.early == []
    assert sorted(acks.done) == ["a1", "a2", "a3", "b1", "b2", "b3"]


def test_sliding_event_time_item_is_acknowledged_after_both_its_windows():
    acks = Acks()
    first = threading.Event()
    # windows of 10 every 5: 6 is in [0, 10) and [5, 15); 11 closes [0, 10)
    p = (acks.source([1, 6, 11, first, 30])
         | ns.sliding(seconds=10, step=5, timestamp=lambda t: t)
         | acks.sink(lambda w: w.start == 0 and first.set()))
    p.run()
    assert [(w.start, w.value) for w in acks.handled] == [
        (-5, [1]), (0, [1, 6]), (5, [6, 11]), (10, [11]), (25, [30]), (30, [30])]
    assert acks.early == []
    assert sorted(acks.done) == [1, 6, 11, 30]


def test_event_time_session_items_are_acknowledged_after_their_own_session():
    acks = Acks()
    a_out = threading.Event()
    # a@6 moves the watermark to 6: session a [0, 5) is out, b [4, 9) still open
    events = [("a", 0), ("b", 4), ("a", 6), a_out, ("b", 20)]
    p = (acks.source(events)
         | ns.session(gap=5, timestamp=lambda e: e[1], key=lambda e: e[0])
         | acks.sink(lambda w: w.key == "a" and a_out.set()))
    p.run()
    assert [(w.key, w.start, w.end) for w in acks.handled] == [
        ("a", 0, 5), ("b", 4, 9), ("a", 6, 11), ("b", 20, 25)]
    assert acks.early == []
    assert len(acks.done) == 4


def test_merged_sessions_acknowledge_all_their_items():
    acks = Acks()
    # 5 bridges the sessions of 1 and 10: one session of three items
    p = (acks.source([10, 1, 5, 40])
         | ns.session(gap=7, timestamp=lambda t: t, lateness=100) | acks.sink())
    p.run()
    assert [w.value for w in acks.handled] == [[10, 1, 5], [40]]
    assert acks.early == []
    assert sorted(acks.done) == [1, 5, 10, 40]


def test_processing_time_keyed_windows_track_per_window():
    acks = Acks()
    clock = VirtualClock(1.0)
    first = threading.Event()

    def at(t):  # a script step that moves the clock (the source runs it in order)
        class Move(threading.Event):
            def wait(self, timeout=None):
                clock.t = t
                return True
        return Move()

    timed = threading.Event()

    def key(s):  # called right after the stage read the clock for the item
        if s == "a1":
            timed.set()
        return s[0]

    # "b1" closes window a [0, 10); "c1" comes after window a was handled
    p = (acks.source(["a1", timed, at(12.0), "b1", first, "c1"])
         | ns.tumbling(seconds=10, key=key, clock=clock)
         | acks.sink(lambda w: w.key == "a" and first.set()))
    p.run()
    assert [(w.key, w.start, w.value) for w in acks.handled] == [
        ("a", 0, ["a1"]), ("b", 10, ["b1"]), ("c", 10, ["c1"])]
    assert acks.early == []
    assert sorted(acks.done) == ["a1", "b1", "c1"]


def test_a_dropped_late_item_is_acknowledged_at_once_and_counted(caplog):
    acks = Acks()
    # 12 closes [0, 10), so 2 is late: acknowledged when dropped, before anything else
    # happens (the source waits for that before sending 25)
    with caplog.at_level(logging.WARNING, logger="nanostream"):
        report = (acks.source([1, 12, 2, acks.acked(2), 25])
                  | ns.tumbling(seconds=10, timestamp=lambda t: t) | acks.sink()).run()
    assert [w.value for w in acks.handled] == [[1], [12], [25]]
    assert acks.early == []
    assert acks.done.index(2) < acks.done.index(12)  # before the window it came after
    assert sorted(acks.done) == [1, 2, 12, 25]
    assert "stage 'tumbling' dropped 1 late item(s)" in caplog.text
    assert report["tumbling"].items_in == 4
    assert report["tumbling"].errors == 0  # late is not an error


def test_a_late_item_given_to_on_late_is_acknowledged_after_the_callback():
    acks = Acks()
    late = []
    stage = ns.session(gap=3, timestamp=lambda t: t,
                       on_late=lambda x: late.append((x, x in acks.done)))
    (acks.source([1, 20, 2, acks.acked(2), 30]) | stage | acks.sink()).run()
    assert late == [(2, False)]
    assert sorted(acks.done) == [1, 2, 20, 30]


def test_an_item_skipped_by_on_error_is_acknowledged_at_once_and_counted():
    acks = Acks()

    def key(x):
        if x == 2:
            raise ValueError("no key")
        return "k"

    stage = ns.sliding(size=2, key=key, on_error="skip")
    report = (acks.source([1, 2, acks.acked(2), 3, 4]) | stage | acks.sink()).run()
    assert [w.value for w in acks.handled] == [[1, 3], [3, 4]]
    assert report["sliding"].errors == 1
    assert acks.early == []
    assert sorted(acks.done) == [1, 2, 3, 4]


def by_index(pairs):
    """Tracked source items for a property test: (index, key, timestamp)."""
    return [(i, k, t) for i, (k, t) in enumerate(pairs)]


TRACKED_SHAPES = {
    "keyed tumbling count": lambda: ns.tumbling(size=2, key=1),
    "unkeyed tumbling count": lambda: ns.tumbling(size=3),
    "keyed sliding count": lambda: ns.sliding(size=3, key=1),
    "sliding count step 2": lambda: ns.sliding(size=3, step=2),
    "event-time tumbling": lambda: ns.tumbling(seconds=10, timestamp=2, lateness=3, key=1),
    "event-time sliding": lambda: ns.sliding(seconds=10, step=4, timestamp=2, lateness=3),
    "keyed event-time sliding": lambda: ns.sliding(seconds=6, step=2, timestamp=2, key=1),
    "event-time session": lambda: ns.session(gap=5, timestamp=2, key=1, lateness=4),
    "agg that fails on some": lambda: ns.tumbling(size=2, key=1, on_error="skip",
                                                  agg=lambda xs: xs[:1 // (len(xs) - 1) + 1]),
}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 40)), max_size=25),
       st.sampled_from(sorted(TRACKED_SHAPES)))
def test_tracked_items_are_acknowledged_once_after_every_window_holding_them(events, shape):
    """Any shape, any input: the same windows as untracked; no item acknowledged
    before a window holding it is handled; every item acknowledged exactly once."""
    items = by_index(events)
    acks = Acks()
    (acks.source(items) | TRACKED_SHAPES[shape]() | acks.sink()).run()
    expected = list(TRACKED_SHAPES[shape]()(items))
    assert acks.handled == expected
    assert acks.early == []
    assert sorted(acks.done) == items


class MovingClock:
    """Every read moves the clock by a second."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


@pytest.mark.parametrize(("make", "once"), [
    (lambda clock: ns.sliding(seconds=7, step=3, clock=clock, key=lambda i: i % 3), False),
    (lambda clock: ns.tumbling(seconds=5, clock=clock), True),
    (lambda clock: ns.session(gap=2, clock=clock, key=lambda i: i % 2), True),
])
def test_processing_time_windows_with_a_moving_clock_track_every_item(make, once):
    """Whatever the idle ticks do, every item is acknowledged once, after its windows."""
    acks = Acks()
    (acks.source(list(range(40))) | make(MovingClock()) | acks.sink()).run()
    assert acks.early == []
    assert sorted(acks.done) == list(range(40))
    members = [x for w in acks.handled for x in w.value]
    assert (sorted(members) if once else sorted(set(members))) == list(range(40))


# -- the effective name and on_error (with_options) -------------------------------------------

def test_with_options_name_and_on_error_apply_inside_the_window():
    stage = ns.tumbling(size=2, key=boom).with_options(name="pairs")
    with pytest.raises(ns.StageError, match="stage 'pairs' failed on item 1") as ei:
        (ns.from_iterable([1, 2]) | stage | ns.sink(lambda w: None)).run()
    assert ei.value.stage == "pairs"
    assert ei.value.item == 1
    assert isinstance(ei.value.__cause__, ValueError)

    skipping = ns.tumbling(size=2, key=boom).with_options(name="pairs", on_error="skip")
    report = ([1, 2, 3] | skipping | ns.sink(lambda w: None)).run()
    assert report["pairs"].errors == 3
    assert report.errors == 3

    late = ns.tumbling(seconds=10, timestamp=lambda t: t, on_late="raise").with_options(
        name="minutes")
    with pytest.raises(ns.StageError, match="stage 'minutes' failed on item 2: ValueError: late"):
        list([1, 12, 2] | late)


def test_agg_errors_are_counted_in_the_report():
    seen = []
    stage = ns.sliding(size=2, agg=sum, on_error=lambda w, exc: seen.append(w.value))
    report = ([1, "x", 2] | stage | ns.sink(lambda w: None)).run()
    assert seen == [[1, "x"], ["x", 2]]
    assert report["sliding"].errors == 2
    assert report["sliding"].items_out == 0


# -- the list handoff ---------------------------------------------------------------------------
#
# In an untracked run, tumbling / sliding count windows (unkeyed) and batch(size) take
# their input as the lists the runtime moves and slice windows out of them. Tracked
# runs and direct calls take items one by one. Both must give the same windows.

def split(xs, cuts):
    """``xs`` cut into consecutive lists at the sorted positions ``cuts`` (empty lists
    included where two cuts coincide)."""
    out, prev = [], 0
    for c in sorted(cuts):
        out.append(xs[prev:c])
        prev = c
    out.append(xs[prev:])
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(), max_size=60), st.integers(1, 8), st.data())
def test_windows_sliced_from_lists_match_the_item_path(xs, size, data):
    step = data.draw(st.integers(1, size))
    lists = split(xs, data.draw(st.lists(st.integers(0, len(xs)), max_size=8)))
    for stage in (ns.sliding(size=size, step=step), ns.tumbling(size=size, agg=sum),
                  ns.batch(size)):
        by_item = list(stage(xs))
        by_list = stage.fn(iter([list(c) for c in lists]), lists=True, **stage.kwargs)
        assert list(by_list) == by_item


def generated(xs):
    @ns.source(name="gen")
    def gen():
        yield from xs  # not in-memory data: it reaches the stage through its channel
    return gen()


@pytest.mark.parametrize("feed", ["memory", "range", "tuple", "iterator", "channel", "tracked"])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 2500])
def test_list_path_windows_in_a_pipeline(feed, n):
    """Empty stream, one item, end of stream mid-window, many lists; read in the
    stage's thread (sliced from a list, range or tuple, or taken from a list's
    iterator), through a channel, and tracked (item by item)."""
    xs = list(range(n))
    done = []

    @ns.source(track=True, name="gen")
    def tracked():
        for x in xs:
            yield x, (lambda x=x: done.append(x))

    def source():
        return {"memory": lambda: ns.from_iterable(xs), "range": lambda: ns.from_iterable(range(n)),
                "tuple": lambda: ns.from_iterable(tuple(xs)),
                "iterator": lambda: ns.from_iterable(iter(xs)),
                "channel": lambda: generated(xs), "tracked": tracked}[feed]()

    assert values(source() | ns.tumbling(size=3)) == [list(p) for p in toolz.partition_all(3, xs)]
    assert values(source() | ns.tumbling(size=3, agg=sum)) == [
        sum(p) for p in toolz.partition_all(3, xs)]
    assert [(w.start, w.value) for w in source() | ns.sliding(size=4, step=3)] == [
        (s, list(v)) for s, v in ref_sliding(xs, 4, 3)]
    assert list(source() | ns.batch(4)) == [list(p) for p in toolz.partition_all(4, xs)]
    if feed == "tracked":
        assert sorted(done) == sorted(xs * 4)


@pytest.mark.parametrize("feed", ["memory", "channel"])
def test_a_failing_agg_inside_a_list_blames_its_window(feed):
    xs = list(range(100))
    xs[57] = "x"   # window [55, 60) of a list of many windows
    src = ns.from_iterable(xs) if feed == "memory" else generated(xs)
    with pytest.raises(ns.StageError, match=r"stage 'tumbling' failed on item Window") as ei:
        (src | ns.tumbling(size=5, agg=sum) | ns.sink(lambda w: None)).run()
    assert ei.value.item == Window(None, 55, 60, [55, 56, "x", 58, 59])
    assert isinstance(ei.value.__cause__, TypeError)

    src = ns.from_iterable(xs) if feed == "memory" else generated(xs)
    out = []
    report = (src | ns.sliding(size=5, step=5, agg=sum, on_error="skip")
              | ns.sink(out.append)).run()
    assert [w.start for w in out] == [s for s in range(0, 100, 5) if s != 55]
    assert report["sliding"].errors == 1


@pytest.mark.parametrize("drain", [True, False])
def test_stop_flushes_or_abandons_the_open_window_of_the_list_path(drain):
    taken = threading.Event()
    out = []

    @ns.source(name="endless")
    def endless():
        i = 0
        while True:
            yield i
            i += 1
            if i == 5:
                taken.set()

    run = (endless() | ns.tumbling(size=10**9, agg=len) | ns.sink(out.append)).start()
    assert taken.wait(10)
    run.stop(drain=drain)
    run.join(10)
    n = run.stats()["tumbling"].items_in
    assert n >= 5
    assert out == ([Window(None, 0, n, n)] if drain else [])


def test_a_slow_window_stage_over_in_memory_data_passes_its_first_windows_on_early():
    """In-memory data is read in small slices first: the windows of the first slice
    reach the sink while the stage still works (it waits here, inside agg, until the
    sink has the first window; reading 1024 items first would never get there)."""
    first = threading.Event()

    def agg(items):
        if items[0] == 100:
            assert first.wait(10), "the first window was held back"
        return items[0]

    def store(w):
        first.set()

    report = (ns.from_iterable(range(2000)) | ns.tumbling(size=1, agg=agg)
              | ns.sink(store)).run()
    assert report["tumbling"].items_out == 2000
