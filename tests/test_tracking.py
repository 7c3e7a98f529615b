"""Completion tracking (DESIGN §3): a ``@source(track=True)`` source learns when
everything derived from one of its items has been handled, and only then."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

import nanostream as ns
import nanostream._runtime as runtime
import nanostream._tracking as tracking
from nanostream import sink, source, transform


class Ledger:
    """What the sinks handled and which items were reported done, with a check,
    at each ``on_done``, that everything derived from the item was handled."""

    def __init__(self, expected=None) -> None:
        self.lock = threading.Lock()
        self.handled: Counter = Counter()        # key -> times a sink call returned
        self.done: Counter = Counter()           # item -> times on_done ran
        self.early: list = []                    # on_done before its outputs were handled
        self.expected = expected or (lambda x: Counter())

    def record(self, key) -> None:
        with self.lock:
            self.handled[key] += 1

    def on_done(self, x):
        def done() -> None:
            with self.lock:
                self.done[x] += 1
                missing = self.expected(x) - self.handled
                if missing:
                    self.early.append((x, dict(missing)))
        return done

    def source(self, items, name="tracked"):
        @source(track=True, name=name)
        def tracked():
            for x in items:
                yield x, self.on_done(x)
        return tracked

    def sink(self, key=lambda y: y, name="record", **options):
        def record(y):
            self.record(key(y))
        return sink(record, name=name, **options)

    def check_all_done(self, items) -> None:
        assert self.early == []
        assert self.done == Counter(items), "on_done must run exactly once per item"


ITEMS = list(range(40))


def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate``; fail (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_chain_reports_every_item_once_after_the_sink():
    led = Ledger(lambda x: Counter({x * 2: 1}))
    (led.source(ITEMS) | transform(lambda x: x * 2) | led.sink()).run()
    led.check_all_done(ITEMS)


def test_fan_out_reports_after_both_branches_sinks():
    led = Ledger(lambda x: Counter({("a", x): 1, ("b", x + 1): 1}))
    slow = threading.Event()

    def gated(x):
        if x == 0:
            slow.wait(10)  # branch b holds item 0 while branch a races ahead
        return x + 1

    p = led.source(ITEMS) | (
        led.sink(lambda y: ("a", y), name="a"),
        transform(gated) | led.sink(lambda y: ("b", y), name="b"),
    )
    run = p.start()
    try:
        # branch a handles everything; item 0 is still held in branch b
        wait_until(lambda: led.handled[("a", ITEMS[-1])] == 1, "branch a to finish")
        assert led.handled[("a", 0)] == 1
        assert led.done[0] == 0, "item 0 reported done before branch b handled it"
    finally:
        slow.set()
    assert run.join(10)
    led.check_all_done(ITEMS)


def test_flat_map_reports_after_every_output():
    def expected(x):
        return Counter({(x, i): 1 for i in range(x % 4)})

    led = Ledger(expected)

    @transform
    def explode(x):
        for i in range(x % 4):  # zero outputs for x % 4 == 0: handled at once
            yield (x, i)

    (led.source(ITEMS) | explode | led.sink()).run()
    led.check_all_done(ITEMS)
    assert sum(led.handled.values()) == sum(x % 4 for x in ITEMS)


def test_filtered_out_items_count_as_handled():
    led = Ledger(lambda x: Counter({x: 1}) if x % 3 == 0 else Counter())
    (led.source(ITEMS) | ns.filter(lambda x: x % 3 == 0) | led.sink()).run()
    led.check_all_done(ITEMS)
    assert set(led.handled) == {x for x in ITEMS if x % 3 == 0}


@pytest.mark.parametrize("workers", [1, 3])
def test_items_skipped_by_on_error_count_as_handled(workers):
    led = Ledger(lambda x: Counter() if x % 5 == 2 else Counter({x: 1}))

    def picky(x):
        if x % 5 == 2:
            raise ValueError(x)
        return x

    (led.source(ITEMS) | transform(picky, on_error="skip", workers=workers)
     | led.sink()).run()
    led.check_all_done(ITEMS)
    assert set(led.handled) == {x for x in ITEMS if x % 5 != 2}


def test_items_handed_to_an_on_error_callable_count_as_handled():
    seen = []
    led = Ledger(lambda x: Counter() if x % 7 == 3 else Counter({x: 1}))

    def picky(x):
        if x % 7 == 3:
            raise ValueError(x)
        return x

    (led.source(ITEMS)
     | transform(picky, on_error=lambda item, exc: seen.append(item))
     | led.sink()).run()
    led.check_all_done(ITEMS)
    assert seen == [x for x in ITEMS if x % 7 == 3]


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("where", ["transform", "sink"])
def test_workers_report_after_the_sink(ordered, where):
    led = Ledger(lambda x: Counter({x * 10: 1}))
    if where == "transform":
        p = (led.source(ITEMS) | transform(lambda x: x * 10, workers=4, ordered=ordered)
             | led.sink())
    else:
        p = (led.source(ITEMS) | transform(lambda x: x * 10)
             | led.sink(workers=4, ordered=ordered))
    p.run()
    led.check_all_done(ITEMS)


def test_workers_flat_map_and_filter_report_every_item():
    led = Ledger(lambda x: Counter({(x, i): 1 for i in range(x % 3)}))

    def explode(x):
        yield from ((x, i) for i in range(x % 3))

    (led.source(ITEMS) | ns.filter(lambda x: True, workers=2)
     | transform(explode, workers=3, ordered=False) | led.sink()).run()
    led.check_all_done(ITEMS)


def test_process_executor_reports_after_the_sink():
    items = list(range(12))
    led = Ledger(lambda x: Counter({x + 100: 1}))
    (led.source(items) | transform(lambda x: x + 100, executor="process")
     | led.sink()).run()
    led.check_all_done(items)


def test_async_stage_reports_after_the_sink():
    led = Ledger(lambda x: Counter({-x: 1}))

    async def negate(x):
        return -x

    (led.source(ITEMS) | transform(negate, workers=3) | led.sink()).run()
    led.check_all_done(ITEMS)


def test_stream_transform_batching_reports_each_member_after_its_batch():
    def batch_of(x):
        return tuple(range(x - x % 3, min(x - x % 3 + 3, len(ITEMS))))

    led = Ledger(lambda x: Counter({batch_of(x): 1}))

    @transform(stream=True)
    def triples(items):
        buf = []
        for x in items:
            buf.append(x)
            if len(buf) == 3:
                yield tuple(buf)
                buf = []
        if buf:
            yield tuple(buf)

    items = ITEMS + [len(ITEMS)]  # 41 items: the last batch is a partial one
    led.expected = lambda x: Counter({tuple(range(x - x % 3, min(x - x % 3 + 3, 41))): 1})
    (led.source(items) | triples | led.sink()).run()
    led.check_all_done(items)
    assert led.handled[(39, 40)] == 1


def test_stream_transform_fanning_out_outputs_reports_after_all_of_them():
    led = Ledger(lambda x: Counter({(x, "a"): 1, (x, "b"): 1}))

    @transform(stream=True)
    def twice(items):
        for x in items:
            yield (x, "a")
            yield (x, "b")

    (led.source(ITEMS) | twice | led.sink()).run()
    led.check_all_done(ITEMS)


def test_stream_sink_reports_when_it_ends():
    consumed = []
    finished = threading.Event()
    led = Ledger()
    early = []

    def on_done_check(x):
        if not finished.is_set():
            early.append(x)

    @sink(stream=True)
    def collect(items):
        for x in items:
            consumed.append(x)
        finished.set()

    @source(track=True)
    def tracked():
        for x in ITEMS:
            yield x, (lambda x=x: (on_done_check(x), led.on_done(x)()))

    (tracked() | collect).run()
    assert consumed == ITEMS
    assert early == []
    led.check_all_done(ITEMS)


def test_fan_in_with_an_untracked_source():
    led = Ledger(lambda x: Counter({x: 1}))
    untracked = ns.from_iterable(range(1000, 1030), name="plain")
    p = (led.source(ITEMS), untracked) | transform(lambda x: x) | led.sink()
    p.run()
    led.check_all_done(ITEMS)
    assert {x for x in led.handled if x >= 1000} == set(range(1000, 1030))


def test_on_done_none_means_the_source_does_not_care_for_that_item():
    led = Ledger(lambda x: Counter({x: 1}))

    @source(track=True)
    def mixed():
        for x in ITEMS:
            yield x, (led.on_done(x) if x % 2 else None)

    (mixed() | led.sink()).run()
    led.check_all_done([x for x in ITEMS if x % 2])


def test_iterating_reports_items_once_yielded():
    yielded = []
    early = []

    @source(track=True)
    def tracked():
        for x in ITEMS:
            yield x, (lambda x=x: early.append(x) if x not in yielded else done.append(x))

    done: list = []
    for y in tracked() | transform(lambda x: x):
        yielded.append(y)
    assert yielded == ITEMS
    assert early == []
    assert sorted(done) == ITEMS


def test_on_done_that_raises_is_logged_and_does_not_break_the_run(caplog):
    seen = []

    def bad():
        raise RuntimeError("bookkeeping broke")

    @source(track=True)
    def tracked():
        for x in range(5):
            yield x, bad

    (tracked() | sink(seen.append)).run()
    assert seen == list(range(5))
    assert caplog.text.count("completion callback") == 5


def test_a_track_source_must_yield_pairs():
    @source(track=True)
    def wrong():
        yield 1

    with pytest.raises(ns.StageError, match="must yield \\(item, on_done\\) pairs") as info:
        (wrong() | sink(print)).run()
    assert info.value.stage == "wrong"


# -- a failed run never reports unhandled items -------------------------------------

def _failing_pipeline(shape, led, fail_on):
    def boom(x):
        if x == fail_on:
            raise ValueError(f"bad {x}")
        led.record(x)

    src = led.source(ITEMS)
    if shape == "sink":
        return src | sink(boom, name="boom")
    if shape == "transform":
        def maybe(x):
            if x == fail_on:
                raise ValueError(f"bad {x}")
            return x
        return src | transform(maybe, name="boom") | led.sink()
    if shape == "sink-workers":
        return src | sink(boom, name="boom", workers=3)
    if shape == "sink-workers-unordered":
        return src | sink(boom, name="boom", workers=3, ordered=False)
    if shape == "fan-out":
        return src | (led.sink(lambda y: ("a", y), name="a"), sink(boom, name="boom"))
    if shape == "stream-sink":
        @sink(stream=True, name="boom")
        def consume(items):
            for x in items:
                if x == fail_on:
                    raise ValueError(f"bad {x}")
                led.record(x)
        return src | consume
    raise AssertionError(shape)


@pytest.mark.parametrize("shape", ["sink", "transform", "sink-workers",
                                   "sink-workers-unordered", "fan-out", "stream-sink"])
def test_a_failed_run_never_reports_unhandled_items_done(shape):
    led = Ledger(lambda x: Counter({x: 1}))
    fail_on = 7
    p = _failing_pipeline(shape, led, fail_on)
    with pytest.raises(ns.StageError) as info:
        p.run()
    assert info.value.stage == "boom"
    if shape != "stream-sink":  # a stream stage does not know which item failed
        assert info.value.item == fail_on
    assert led.done[fail_on] == 0, "the failed item was reported done"
    for x, n in led.done.items():
        assert n == 1
        if shape == "fan-out":
            assert led.handled[x] == 1, f"item {x} reported done but never handled"
            assert led.handled[("a", x)] == 1, f"item {x} reported done but never handled"
        else:
            assert led.handled[x] == 1, f"item {x} reported done but never handled"


def test_drain_false_never_reports_abandoned_items():
    led = Ledger(lambda x: Counter({x: 1}))
    hold = threading.Event()
    entered = threading.Event()

    @sink
    def stuck(x):
        if x == 3:
            entered.set()
            hold.wait(10)
        led.record(x)

    @source(track=True)
    def endless():
        i = 0
        while True:
            yield i, led.on_done(i)
            i += 1

    run = (endless() | stuck).start()
    assert entered.wait(10)
    stopper = threading.Thread(target=run.stop, kwargs={"drain": False})
    stopper.start()
    # the stop aborts every channel; release the sink only once the abort is visible
    wait_until(lambda: run._aborted, "the run to abort")
    hold.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert not run.running
    # exactly what the sink handled is reported; what was queued is abandoned
    assert set(led.done) == set(led.handled)
    assert all(n == 1 for n in led.done.values())
    assert run.stats()["endless"].items_out > len(led.done)


def test_stop_drain_reports_everything_taken_in():
    led = Ledger(lambda x: Counter({x: 1}))
    got_some = threading.Event()

    @source(track=True)
    def endless():
        i = 0
        while True:
            yield i, led.on_done(i)
            i += 1

    def rec(x):
        led.record(x)
        if x >= 20:
            got_some.set()

    run = (endless() | transform(lambda x: x, workers=2) | sink(rec)).start()
    assert got_some.wait(10)
    run.stop(drain=True)
    assert run.join(10)
    produced = run.stats()["endless"].items_out
    assert produced >= 21
    led.check_all_done(range(produced))


# -- zero cost when nothing is tracked ----------------------------------------------

class _NoTickets:
    def __init__(self, *args, **kwargs) -> None:
        raise AssertionError("an untracked pipeline constructed a Ticket")


@pytest.fixture
def no_tickets(monkeypatch):
    monkeypatch.setattr(tracking, "Ticket", _NoTickets)
    monkeypatch.setattr(runtime, "Ticket", _NoTickets)
    for name in ("retain", "release", "group"):
        real = getattr(runtime, name)

        def guarded(tickets, *args, _real=real, _name=name):
            tickets = list(tickets)
            assert all(t is None for t in tickets), f"{_name} got a real ticket"
            return _real(tickets, *args)
        monkeypatch.setattr(runtime, name, guarded)


def test_untracked_pipelines_never_construct_a_ticket(no_tickets):
    out = []

    @transform(stream=True)
    def pairs(items):
        buf = []
        for x in items:
            buf.append(x)
            if len(buf) == 2:
                yield buf
                buf = []
        if buf:
            yield buf

    def explode(x):
        yield x
        yield -x

    p = (range(30) | ns.filter(lambda x: x % 2 == 0) | transform(explode)
         | transform(abs, workers=3) | pairs | (sink(out.append), transform(len) | sink(print)))
    p.run()
    assert sorted(v for b in out for v in b) == sorted(abs(y) for x in range(0, 30, 2)
                                                       for y in (x, -x))
    assert sorted(ns.merge(ns.from_iterable([1, 2]), ns.from_iterable([3]))
                  | transform(lambda x: x, on_error="skip")) == [1, 2, 3]
    assert (range(5) | sink(lambda x: None, workers=2, on_error="skip")).run()


def test_the_zero_cost_guard_does_notice_a_tracked_source(no_tickets):
    @source(track=True)
    def tracked():
        yield 1, lambda: None

    with pytest.raises(ns.StageError, match="constructed a Ticket"):
        (tracked() | sink(print)).run()


@pytest.mark.parametrize("workers", [1, 3])
def test_a_stage_that_wants_no_more_input_reports_what_it_dropped(workers):
    """A stream stage returning early (like ``take``) discards the rest: every item
    the source produced is reported done, the dropped ones included."""
    led = Ledger()
    kept = []

    @source(track=True)
    def endless():
        i = 0
        while True:
            yield i, led.on_done(i)
            i += 1

    @transform(stream=True)
    def first_five(items):
        for x in items:
            yield x
            if x == 4:
                return

    run = (endless() | transform(lambda x: x, workers=workers) | first_five
           | sink(kept.append)).start()
    assert run.join(10)
    produced = run.stats()["endless"].items_out
    assert kept == [0, 1, 2, 3, 4]
    assert produced >= 5
    assert led.done == Counter(range(produced))


def test_diamond_reports_after_both_copies_reach_the_sink():
    led = Ledger(lambda x: Counter({("a", x): 1, ("b", x): 1}))
    p = led.source(ITEMS) | (transform(lambda x: ("a", x)),
                             transform(lambda x: ("b", x), workers=2)) | led.sink()
    p.run()
    led.check_all_done(ITEMS)


def test_slow_fused_stages_that_split_apart_keep_reporting():
    # both stages slow per item: the fused link splits into two threads mid-run
    led = Ledger(lambda x: Counter({x + 1: 1}))

    def slow_inc(x):
        time.sleep(0.0002)  # the work
        return x + 1

    def slow_record(y):
        time.sleep(0.0002)
        led.record(y)

    (led.source(ITEMS * 3) | transform(slow_inc) | sink(slow_record)).run()
    assert led.early == []
    assert led.done == Counter(ITEMS * 3)


def test_windows_after_a_flat_map_report_every_item_done():
    # a flat-map's outputs share their input's ticket; an explicitly tracking stage
    # (a keyed window) must give back one reference per item, not one per ticket
    done = []

    @source(track=True)
    def src():
        for i in range(6):
            yield i, (lambda i=i: done.append(i))

    @transform
    def twice(x):
        yield x
        yield x

    out = []
    (src() | twice | ns.tumbling(size=2, key=lambda x: x % 2) | sink(out.append)).run()
    assert sorted(done) == list(range(6))
    assert sorted(v for w in out for v in w.value) == sorted(list(range(6)) * 2)


# -- sinks that take lists and report done(n) -------------------------------------------------

def lists_sink(body, name="lists"):
    """An internal sink taking lists (``internal={"lists": True}``), as sql_sink is."""
    from nanostream._stage import Stage

    def fn(items, ctx=None, lists=False, done=None):
        assert lists, "the runtime hands this stage lists"
        body(items, done)

    return Stage(fn, "sink", {"name": name, "stream": True},
                 internal={"lists": True, "context": True})


def test_a_lists_sink_reports_the_oldest_items_with_done_n():
    led = Ledger()
    seen, reports = [], []

    def body(items, done):
        held = 0
        for chunk in items:
            assert isinstance(chunk, list)
            assert chunk, "non-empty lists of bare items"
            seen.extend(chunk)
            held += len(chunk)
            while held >= 3:
                before = set(led.done)
                done(3)  # the oldest three held are handled, and only they
                reports.append(set(led.done) - before)
                held -= 3
        done(held)

    (led.source(ITEMS)() | lists_sink(body)).run()
    assert seen == ITEMS
    assert reports == [set(ITEMS[i:i + 3]) for i in range(0, 39, 3)]
    led.check_all_done(ITEMS)


def test_a_lists_sink_reporting_more_than_it_holds_fails_the_run():
    led = Ledger()

    def body(items, done):
        for chunk in items:
            done(len(chunk) + 1)

    with pytest.raises(ns.StageError, match="reports more items than the stage holds"):
        (led.source(ITEMS)() | lists_sink(body)).run()
    assert led.done == Counter()


def test_an_untracked_lists_sink_may_report_without_cost():
    seen = []

    def body(items, done):
        for chunk in items:
            seen.extend(chunk)
            done(len(chunk))

    (ns.from_iterable(ITEMS) | lists_sink(body)).run()
    assert seen == ITEMS
