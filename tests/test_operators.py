"""Operators: each against its plain-Python / toolz equivalent, edge cases, bad arguments."""

from __future__ import annotations

import functools
import itertools
import pickle
import threading

import pytest
import toolz
from hypothesis import given, settings
from hypothesis import strategies as st

import nanostream as ns
from nanostream._runtime import TICK

ints = st.lists(st.integers(-50, 50), max_size=40)
fast = settings(max_examples=40, deadline=None)


class VirtualClock:
    """A clock that moves only when told to (or when its ``sleep`` is called)."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t
        self.reads = 0
        self.sleep_calls: list[float] = []
        self.cond = threading.Condition()

    def __call__(self) -> float:
        with self.cond:
            self.reads += 1
            self.cond.notify_all()
            return self.t

    def sleep(self, seconds: float) -> None:
        self.sleep_calls.append(seconds)
        self.t += seconds

    def wait_for(self, predicate, timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "timed out waiting on the clock"


def add(a, b):
    return a + b


# -- per-item operators ---------------------------------------------------------------------

@fast
@given(ints)
def test_flat_map_filter_map_flatten_tap_match_plain_python(xs):
    assert list(xs | ns.flat_map(lambda x: [x] * (x % 3))) == [
        y for x in xs for y in [x] * (x % 3)]
    assert list(xs | ns.filter_map(lambda x: x * 2 if x % 2 else None)) == [
        x * 2 for x in xs if x % 2]
    assert list([[x, x] for x in xs] | ns.flatten()) == [y for x in xs for y in (x, x)]
    seen = []
    assert list(xs | ns.tap(seen.append)) == xs
    assert seen == xs


def test_per_item_operators_take_workers_and_keep_order():
    xs = list(range(200))
    assert list(xs | ns.flat_map(lambda x: (x, -x), workers=4)) == [
        y for x in xs for y in (x, -x)]
    assert list(xs | ns.filter_map(lambda x: x if x % 7 else None, workers=3)) == [
        x for x in xs if x % 7]
    seen = []
    lock = threading.Lock()

    def record(x):
        with lock:
            seen.append(x)

    assert list(xs | ns.tap(record, workers=4)) == xs
    assert sorted(seen) == xs


def test_per_item_operators_are_unit_testable_and_picklable():
    seen = []
    assert ns.tap(seen.append)(3) == 3
    assert seen == [3]
    assert ns.filter_map(lambda x: None)(1) == ()
    cases = [(ns.tap(abs), [1, -2]), (ns.filter_map(abs), [0, -2]),
             (ns.flat_map(range), [2, 3]), (ns.flatten(), [[1], [2, 3]])]
    for stage, xs in cases:
        again = pickle.loads(pickle.dumps(stage))
        assert list(xs | again) == list(xs | stage)


def test_per_item_errors_follow_on_error():
    with pytest.raises(ns.StageError, match=r"stage 'flat_map\(<lambda>\)' failed on item 0"):
        list([1, 0] | ns.flat_map(lambda x: [1 / x]))
    assert list([1, 0, 2] | ns.flat_map(lambda x: [1 / x], on_error="skip")) == [1.0, 0.5]
    assert list([1, 0] | ns.tap(lambda x: 1 / x, on_error="skip")) == [1]


@pytest.mark.parametrize("make", [ns.flat_map, ns.filter_map, ns.tap])
def test_per_item_bad_arguments(make):
    with pytest.raises(TypeError, match=rf"{make.__name__} needs a callable, got int 3"):
        make(3)
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        make(abs, workers=0)
    with pytest.raises(ValueError, match="stream=True does not apply"):
        make(abs, stream=True)


# -- batch ------------------------------------------------------------------------------------

@fast
@given(ints, st.integers(1, 7))
def test_batch_matches_partition_all(xs, n):
    assert list(xs | ns.batch(n)) == [list(p) for p in toolz.partition_all(n, xs)]


def test_batch_edges():
    assert list([] | ns.batch(3)) == []
    assert list([1] | ns.batch(3)) == [[1]]
    assert list(range(4) | ns.batch(1)) == [[0], [1], [2], [3]]
    assert list(range(4) | ns.batch(2, timeout=5)) == [[0, 1], [2, 3]]


def test_batch_timeout_in_virtual_time():
    clock = VirtualClock()
    stage = ns.batch(3, timeout=5, clock=clock)

    def feed():
        yield "a"            # t=0: a batch starts
        clock.t = 4
        yield "b"
        clock.t = 5
        yield TICK           # 5 s after "a": flushed on the idle tick
        yield "c"            # t=5: a new batch
        clock.t = 11
        yield "d"            # arrives after the timeout: closes the batch it joins
        yield "e"
        yield "f"
        yield "g"            # size reached first
        yield TICK
        yield "h"            # partial batch flushed at end of stream

    assert list(stage(feed())) == [["a", "b"], ["c", "d"], ["e", "f", "g"], ["h"]]


def test_batch_timeout_in_a_pipeline_flushes_on_an_idle_tick():
    clock = VirtualClock()
    release, got = threading.Event(), threading.Event()
    out = []

    @ns.source
    def one_then_wait():
        yield "a"
        assert release.wait(10)
        yield "b"

    def collect(b):
        out.append(b)
        got.set()

    p = one_then_wait() | ns.batch(100, timeout=2, clock=clock) | ns.sink(collect)
    with p.start() as run:
        # once the stage took "a" and read the clock for it, only a tick can flush it
        clock.wait_for(lambda: run.stats()["batch"].items_in >= 1)
        r0 = clock.reads
        clock.wait_for(lambda: clock.reads > r0)
        clock.t = 2
        assert got.wait(10)
        release.set()
        assert run.join(10)
    assert out[0] == ["a"]
    assert out[1:] == [["b"]]


def test_batch_releases_tracked_items_only_after_the_batch_is_handled():
    done = []

    @ns.source(track=True)
    def tracked():
        for i in range(10):
            yield i, (lambda i=i: done.append(i))

    handled = []

    def store(b):
        assert not set(b) & set(done)
        handled.append(b)

    (tracked() | ns.batch(4) | ns.sink(store)).run()
    assert handled == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sorted(done) == list(range(10))


# -- scan, stateful_map, reduce -----------------------------------------------------------------

@fast
@given(ints)
def test_scan_matches_accumulate(xs):
    assert list(xs | ns.scan(add)) == list(itertools.accumulate(xs, add))
    assert list(xs | ns.scan(add, 100)) == list(itertools.accumulate(xs, add, initial=100))[1:]
    assert list(xs | ns.scan(max)) == list(toolz.accumulate(max, xs))


@fast
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers()), max_size=40))
def test_keyed_scan_is_a_running_aggregate_per_key(pairs):
    got = list(pairs | ns.scan(lambda acc, p: acc + p[1], 0, key=lambda p: p[0]))
    totals: dict[str, int] = {}
    expected = []
    for k, v in pairs:
        totals[k] = totals.get(k, 0) + v
        expected.append((k, totals[k]))
    assert got == expected


def test_scan_initial_is_copied_per_key_and_per_run():
    stage = ns.scan(lambda acc, x: acc + [x], [], key=lambda x: x % 2)
    assert list(range(4) | stage) == [(0, [0]), (1, [1]), (0, [0, 2]), (1, [1, 3])]
    assert list(range(2) | stage) == [(0, [0]), (1, [1])]  # a fresh state on a new run
    appending = ns.scan(lambda acc, x: (acc.append(x), acc)[1], [])
    assert list([1] | appending) == [[1]]
    assert list([2] | appending) == [[2]]


def test_scan_edges_and_errors():
    assert list([] | ns.scan(add, 0)) == []
    assert list([7] | ns.scan(add)) == [7]
    with pytest.raises(ns.StageError, match=r"stage 'scan' failed on item 'x': TypeError"):
        list([1, "x"] | ns.scan(add, 0))
    assert list([1, "x", 2] | ns.scan(add, 0, on_error="skip")) == [1, 3]
    bad = []
    assert list([1, "x", 2] | ns.scan(add, on_error=lambda item, exc: bad.append(item))) == [
        1, 3]
    assert bad == ["x"]


def test_stateful_map():
    def dedupe_runs(prev, x):  # emit x only when it changes
        return x, (None if x == prev else x)

    assert list([1, 1, 2, 2, 1] | ns.stateful_map(dedupe_runs) | ns.filter(
        lambda x: x is not None)) == [1, 2, 1]

    def count_then_forget(n, x):  # per key, forget the state after 2 items
        n = (n or 0) + 1
        return (None if n == 2 else n), n

    got = list("aabab" | ns.stateful_map(count_then_forget, key=lambda c: c))
    assert got == [("a", 1), ("a", 2), ("b", 1), ("a", 1), ("b", 2)]
    with pytest.raises(ns.StageError, match=r"failed on item 1: TypeError"):
        list([1] | ns.stateful_map(lambda s, x: x))  # not a (state, output) pair


@fast
@given(ints)
def test_reduce_matches_functools(xs):
    assert list(xs | ns.reduce(add, 0)) == [functools.reduce(add, xs, 0)]
    assert list(xs | ns.reduce(add)) == ([functools.reduce(add, xs)] if xs else [])
    keyed = list(xs | ns.reduce(lambda n, _: n + 1, 0, key=lambda x: x % 3))
    assert keyed == list(toolz.countby(lambda x: x % 3, xs).items())


def test_reduce_emits_on_stop_drain():
    started = threading.Event()

    @ns.source
    def endless():
        for i in itertools.count():
            if i == 10:
                started.set()
            yield 1

    out = []
    run = (endless() | ns.reduce(add, 0) | ns.sink(out.append)).start()
    assert started.wait(10)
    run.stop(drain=True)
    assert run.join(10)
    assert out == [run.stats()["reduce"].items_in]
    assert out[0] >= 10


# -- take, take_while, skip -----------------------------------------------------------------------

@fast
@given(ints, st.integers(0, 50))
def test_take_and_skip_match_slicing(xs, n):
    assert list(xs | ns.take(n)) == xs[:n]
    assert list(xs | ns.skip(n)) == xs[n:]
    assert list(xs | ns.take_while(lambda x: x < n)) == list(
        itertools.takewhile(lambda x: x < n, xs))


def endless_source(closed: threading.Event):
    @ns.source(name="endless")
    def endless():
        try:
            yield from itertools.count()
        finally:
            closed.set()

    return endless()


def test_take_ends_an_endless_stream_and_stops_the_source():
    closed = threading.Event()
    assert list(endless_source(closed) | ns.take(5)) == [0, 1, 2, 3, 4]
    assert closed.wait(10)


def test_take_stops_the_source_through_stages_and_in_run():
    closed = threading.Event()
    out = []
    report = (endless_source(closed) | ns.transform(lambda x: x * 2) | ns.take(3)
              | ns.sink(out.append)).run(timeout=30)
    assert out == [0, 2, 4]
    assert closed.wait(10)
    assert report["take"].items_out == 3


def test_take_zero_and_take_while_end_an_endless_stream():
    closed = threading.Event()
    assert list(endless_source(closed) | ns.take(0)) == []
    assert closed.wait(10)
    closed = threading.Event()
    assert list(endless_source(closed) | ns.take_while(lambda x: x < 3)) == [0, 1, 2]
    assert closed.wait(10)


def test_take_while_predicate_errors():
    with pytest.raises(ns.StageError, match="stage 'take_while' failed on item 'a'"):
        list([1, "a"] | ns.take_while(lambda x: x < 3))
    assert list([1, "a", 2, 5, 1] | ns.take_while(lambda x: x < 3, on_error="skip")) == [1, 2]


def test_take_with_a_tracked_source_acknowledges_what_it_took():
    done = []

    @ns.source(track=True)
    def tracked():
        for i in itertools.count():
            yield i, (lambda i=i: done.append(i))

    assert list(tracked() | ns.take(3)) == [0, 1, 2]
    assert {0, 1, 2} <= set(done)


# -- distinct --------------------------------------------------------------------------------

@fast
@given(st.lists(st.integers(0, 10), max_size=40))
def test_distinct_matches_toolz_unique(xs):
    assert list(xs | ns.distinct()) == list(toolz.unique(xs))
    assert list(xs | ns.distinct(key=lambda x: x % 4)) == list(
        toolz.unique(xs, key=lambda x: x % 4))


@fast
@given(st.lists(st.integers(0, 6), max_size=40), st.integers(1, 4))
def test_distinct_maxsize_remembers_the_most_recent_keys(xs, maxsize):
    recent: list[int] = []  # least recently seen first
    expected = []
    for x in xs:
        if x in recent:
            recent.remove(x)
        else:
            expected.append(x)
        recent.append(x)
        del recent[:-maxsize]
    assert list(xs | ns.distinct(maxsize=maxsize)) == expected


def test_distinct_edges_and_errors():
    assert list([] | ns.distinct()) == []
    assert list([{"id": 1}, {"id": 1}, {"id": 2}] | ns.distinct(key="id")) == [
        {"id": 1}, {"id": 2}]
    with pytest.raises(ns.StageError, match=r"failed on item \[1\]: TypeError: unhashable"):
        list([[1]] | ns.distinct())
    assert list([1, [1], 2] | ns.distinct(on_error="skip")) == [1, 2]


# -- rate_limit ------------------------------------------------------------------------------

def test_rate_limit_paces_items_in_virtual_time():
    clock = VirtualClock()
    stage = ns.rate_limit(2, clock=clock, sleep=clock.sleep)
    times = [(x, clock()) for x in stage(range(5))]
    assert times == [(0, 0), (1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0)]


def test_rate_limit_burst_and_idle_refill():
    clock = VirtualClock()

    def feed():
        yield from range(3)
        clock.t += 10  # idle long enough to refill the bucket
        yield from range(3, 6)

    stage = ns.rate_limit(1, burst=2, clock=clock, sleep=clock.sleep)
    times = [(x, clock()) for x in stage(feed())]
    assert times == [(0, 0), (1, 0), (2, 1), (3, 11), (4, 11), (5, 12)]


def test_rate_limit_in_a_pipeline_with_a_virtual_clock():
    clock = VirtualClock()
    out = list(range(4) | ns.rate_limit(4, clock=clock, sleep=clock.sleep))
    assert out == [0, 1, 2, 3]
    assert clock.sleep_calls == [0.25] * 3


def test_rate_limit_wait_is_interrupted_by_a_stop_without_drain():
    """A wait of about 11 days: stop(drain=False) ends it at once (a stage still
    sleeping after the grace period would be named in a RuntimeWarning, an error here)."""
    waiting = threading.Event()
    reads = []

    def clock():  # the second read is for item 1, which must then wait 1e6 s
        reads.append(0.0)
        if len(reads) == 2:
            waiting.set()
        return 0.0

    closed = threading.Event()
    out = []
    run = (endless_source(closed) | ns.rate_limit(1e-6, clock=clock)
           | ns.sink(out.append)).start()
    assert waiting.wait(10)
    run.stop(drain=False)
    assert not run.running
    assert run.join(0) is True  # stopped, not failed
    assert closed.wait(10)
    assert out in ([], [0])
    assert len(reads) == 2  # it never woke up to read the clock again


def test_rate_limit_passes_on_what_is_ready_before_it_waits():
    """Outputs are buffered inside the stage; a wait flushes them first."""
    got_first = threading.Event()
    release = threading.Event()
    out = []

    def sleep(seconds):  # the wait for item 1: item 0 must already be downstream
        assert got_first.wait(10), "item 0 was held back during the wait"
        release.set()

    def collect(x):
        out.append(x)
        got_first.set()

    (range(2) | ns.rate_limit(1, clock=lambda: 0.0, sleep=sleep) | ns.sink(collect)).run()
    assert release.is_set()
    assert out == [0, 1]


# -- the effective name and on_error (with_options) -------------------------------------------

def test_with_options_name_shows_in_the_stage_error():
    stage = ns.scan(add, 0).with_options(name="total")
    with pytest.raises(ns.StageError, match="stage 'total' failed on item 'x'") as ei:
        ([1, "x"] | stage | ns.sink(lambda x: None)).run()
    assert ei.value.stage == "total"
    assert ei.value.item == "x"
    assert isinstance(ei.value.__cause__, TypeError)
    with pytest.raises(ns.StageError, match="stage 'first' failed on item 'a'"):
        list([1, "a"] | ns.take_while(lambda x: x < 3).with_options(name="first"))


@pytest.mark.parametrize(("make", "name"), [
    (lambda: ns.scan(add, 0), "scan"),
    (lambda: ns.stateful_map(lambda s, x: (x, x + 1)), "stateful_map"),
    (lambda: ns.reduce(add, 0), "reduce"),
    (lambda: ns.distinct(key=lambda x: x + 0), "distinct"),
    (lambda: ns.take_while(lambda x: x + 1 < 100), "take_while"),
])
def test_skipped_items_are_counted_in_the_report(make, name):
    report = ([1, "x", 2, "y", 3] | make().with_options(on_error="skip", name=name)
              | ns.sink(lambda x: None)).run()
    assert report[name].errors == 2
    assert report.errors == 2
    assert report[name].items_in == 5


def test_with_options_on_error_callable_gets_the_item():
    bad = []
    stage = ns.scan(add, 0).with_options(on_error=lambda item, exc: bad.append(item))
    assert list([1, "x", 2] | stage) == [1, 3]
    assert bad == ["x"]


# -- bad arguments, options, reprs ----------------------------------------------------------------

@pytest.mark.parametrize(("make", "exc", "message"), [
    (lambda: ns.batch(0), ValueError, r"^batch size must be >= 1, got 0$"),
    (lambda: ns.batch("3"), TypeError, "batch size must be an int, got str '3'"),
    (lambda: ns.batch(3, timeout=0), ValueError, "batch timeout must be a finite number of "
                                                 "seconds > 0, got 0"),
    (lambda: ns.batch(3, clock=lambda: 0), ValueError, "clock= only matters with timeout"),
    (lambda: ns.batch(3, timeout=1, clock=5), TypeError, "batch clock must be callable"),
    (lambda: ns.batch(3, on_error="skip"), ValueError,
     "batch calls no function of yours, so on_error does not apply"),
    (lambda: ns.batch(3, workers=2), ValueError, "option 'workers' does not apply"),
    (lambda: ns.batch(3, timout=1), TypeError, "did you mean 'timeout'"),
    (lambda: ns.take(-1), ValueError, "take n must be >= 0, got -1"),
    (lambda: ns.take(None), TypeError, "take n must be an int, got NoneType"),
    (lambda: ns.skip(-2), ValueError, "skip n must be >= 0, got -2"),
    (lambda: ns.take_while(3), TypeError, "take_while needs a callable predicate"),
    (lambda: ns.scan(0), TypeError, r"scan needs a callable \(accumulator, item\)"),
    (lambda: ns.scan(add, key=[1]), TypeError, "scan key must be a function of the item"),
    (lambda: ns.reduce(None), TypeError, "reduce needs a callable"),
    (lambda: ns.stateful_map("f"), TypeError, "stateful_map needs a callable"),
    (lambda: ns.distinct(maxsize=0), ValueError, "distinct maxsize must be >= 1, got 0"),
    (lambda: ns.rate_limit(0), ValueError, "rate_limit per_second must be a finite number > 0"),
    (lambda: ns.rate_limit("fast"), TypeError, "per_second must be a number of items per second"),
    (lambda: ns.rate_limit(5, burst=0), ValueError, "rate_limit burst must be >= 1, got 0"),
    (lambda: ns.scan(add, 0, queue_size=0), ValueError, "queue_size must be >= 1, got 0"),
    (lambda: ns.scan(add, 0, on_error="ignore"), ValueError, "on_error must be 'raise', 'skip'"),
])
def test_bad_arguments(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


def test_stateful_operators_take_stage_options():
    stage = ns.scan(add, 0, name="total", queue_size=8)
    assert stage.name == "total"
    assert stage.option("queue_size") == 8
    with pytest.raises(ns.StageError, match="stage 'total' failed on item 'x'"):
        list([1, "x"] | stage)
    report = ([1, 2, 3] | ns.batch(2, name="pairs") | ns.sink(lambda b: None)).run()
    assert report["pairs"].items_in == 3
    assert report["pairs"].items_out == 2


def test_reprs_name_the_operator_and_what_was_set():
    assert repr(ns.batch(3)) == "<transform 'batch'(size=3) stream=True>"
    assert repr(ns.take(2)) == "<transform 'take'(n=2) stream=True>"
    assert repr(ns.tap(print)) == "<transform 'tap(print)'>"
    assert repr(ns.flat_map(str.split, workers=2)) == "<transform 'flat_map(split)' workers=2>"


def test_stateful_operators_pickle():
    for stage in (ns.batch(3), ns.scan(add, 0), ns.distinct(), ns.take(2), ns.skip(1),
                  ns.reduce(add), ns.tumbling(size=2), ns.batch(2, timeout=1)):
        again = pickle.loads(pickle.dumps(stage))
        assert list(range(5) | again) == list(range(5) | stage)


def test_operators_compose_into_a_pipeline():
    words = ["a b", "c a", "", "b a"]
    p = (words | ns.flat_map(str.split) | ns.scan(lambda n, w: n + 1, 0, key=lambda w: w)
         | ns.filter(lambda kv: kv[1] >= 2) | ns.take(2))
    assert list(p) == [("a", 2), ("b", 2)]
