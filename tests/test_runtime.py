"""Runtime semantics of the threaded executor (DESIGN §3).

Every test is deterministic: threads meet on Events and Barriers, counters sit
under locks, and a bounded polling loop (``wait_until``) only ever waits for a
state that must come; sleeps appear only as the *work* of a stage. The autouse
guard in conftest.py checks that no run and no ``nanostream:`` thread is left.
"""

from __future__ import annotations

import _thread
import asyncio
import itertools
import threading
import time

import pytest

import nanostream as ns
import nanostream._runtime as runtime
from nanostream import sink, source, transform

WAIT = 10.0  # upper bound for anything that should happen at once


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    """Poll ``predicate`` until true; fail (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


class Endless:
    """An infinite source that counts what it yielded and notes when it is closed."""

    def __init__(self, name: str = "endless") -> None:
        self.produced = 0
        self.closed = threading.Event()
        self.name = name

        @source(name=name)
        def endless():
            try:
                for i in itertools.count():
                    self.produced += 1
                    yield i
            finally:
                self.closed.set()

        self.stage = endless


class Collector:
    """A thread-safe sink that records items and can wait for a count."""

    def __init__(self) -> None:
        self.items: list = []
        self.cond = threading.Condition()

    def add(self, x) -> None:
        with self.cond:
            self.items.append(x)
            self.cond.notify_all()

    def wait_for(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, WAIT), \
                f"only {len(self.items)} of {n} items arrived"

    def sink(self, name="collect", **options):
        return sink(self.add, name=name, **options)


class Boom(Exception):
    pass


def fail_on(value, name="fails", **options):
    def check(x):
        if x == value:
            raise Boom(f"bad item {x}")
        return x
    return transform(check, name=name, **options)


# -- back-pressure ----------------------------------------------------------------

@pytest.mark.parametrize("q", [1, 3, 16])
def test_fast_source_stays_within_the_queue_bound_of_a_blocked_sink(q):
    src = Endless()
    gate = threading.Event()
    started = threading.Event()

    def blocked(x):
        started.set()
        gate.wait(WAIT)

    p = src.stage() | transform(lambda x: x, name="mid", queue_size=q) | sink(
        blocked, name="blocked", queue_size=q)
    run = p.start()
    try:
        assert started.wait(WAIT)
        # the source is blocked once it waits to put into mid's full queue
        wait_until(lambda: run.stats()["mid"].queue.waiting_producers >= 1,
                   "the source to block")
        # Each stage holds at most one batch taken from its queue (<= q items) while
        # its queue is full again (q): sink and mid give 4q, plus the item the source
        # is trying to put.
        bound = 4 * q + 1
        produced = src.produced
        assert q < produced <= bound
        s = run.stats()
        assert s["mid"].queue.queued <= q
        assert s["blocked"].queue.queued <= q
    finally:
        gate.set()
        run.stop(drain=False)
    assert src.closed.is_set()


@pytest.mark.parametrize(("workers", "executor"), [(2, "thread"), (4, "thread"),
                                                 (2, "async")])
def test_a_stage_with_workers_keeps_the_source_within_a_bound(workers, executor):
    q = 4
    src = Endless()
    gate = threading.Event()
    started = threading.Event()

    def blocked(x):
        started.set()
        gate.wait(WAIT)

    async def aident(x):
        return x

    fn = aident if executor == "async" else (lambda x: x)
    p = src.stage() | transform(fn, name="mid", queue_size=q, workers=workers) | sink(
        blocked, name="blocked", queue_size=q)
    run = p.start()
    try:
        assert started.wait(WAIT)
        wait_until(lambda: run.stats()["mid"].queue.waiting_producers >= 1,
                   "the source to block")
        # mid's queue (q), at most 4 * workers chunks of <= q items taken from it and
        # not yet passed on, the sink's batch and queue (q each), the item being put
        bound = q * (4 * workers + 3) + 1
        assert q < src.produced <= bound
    finally:
        gate.set()
        run.stop(drain=False)


@pytest.mark.parametrize("fuse", [True, False])
def test_memory_source_is_bounded_by_batches_not_by_its_length(fuse, monkeypatch):
    monkeypatch.setattr(ns.Run, "fuse", fuse)
    gate = threading.Event()
    started = threading.Event()

    def blocked(x):
        started.set()
        gate.wait(WAIT)

    p = (ns.from_iterable(range(1_000_000), name="big")
         | transform(lambda x: x, name="mid", queue_size=4) | sink(blocked, queue_size=4))
    run = p.start()
    try:
        assert started.wait(WAIT)
        if not fuse:  # fused, the source runs in the blocked thread itself
            wait_until(lambda: run.stats()["mid"].queue.waiting_producers >= 1,
                       "the source to block")
        # an in-memory source moves slices of BATCH items (a slice larger than a
        # queue is accepted whole by an empty queue): five slices at most are out
        out = run.stats()["big"].items_out
        assert out <= 5 * runtime.BATCH
    finally:
        gate.set()
        run.stop(drain=False)


@pytest.mark.parametrize("shape", ["chain", "workers", "stream", "fan-out", "flat-map",
                                   "async"])
def test_a_lone_item_from_a_slow_source_is_not_held_back(shape):
    arrived = threading.Event()
    seen = []

    @source
    def slow():
        yield 1
        # the next item comes only once the first one went all the way through
        if not arrived.wait(WAIT):
            raise AssertionError("the lone item was held back")
        yield 2

    def reach(x):
        seen.append(x)
        if x == 1:
            arrived.set()

    async def aident(x):
        return x

    @transform(stream=True)
    def passthrough(items):
        yield from items

    @transform
    def flat(x):
        yield x

    mids = {
        "chain": transform(lambda x: x) | transform(lambda x: x),
        "workers": transform(lambda x: x, workers=4),
        "stream": passthrough,
        "fan-out": transform(lambda x: x),
        "flat-map": flat,
        "async": transform(aident, workers=2),
    }
    if shape == "fan-out":
        p = slow() | (sink(reach), sink(lambda x: None))
    else:
        p = slow() | mids[shape] | sink(reach)
    p.run()
    assert seen == [1, 2]


def test_a_lone_item_is_not_held_back_when_iterating():
    arrived = threading.Event()

    @source
    def slow():
        yield "a"
        if not arrived.wait(WAIT):
            raise AssertionError("the lone item was held back")
        yield "b"

    out = []
    for x in slow() | transform(str.upper):
        out.append(x)
        arrived.set()
    assert out == ["A", "B"]


# -- parallelism and order ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["map", "flat-map", "filter", "sink"])
def test_workers_calls_really_overlap(kind):
    n = 4
    barrier = threading.Barrier(n, timeout=WAIT)

    def meet(x):
        if x <= n:  # the first n items: each its own chunk, none can finish alone
            barrier.wait()  # only passes with n calls in flight at once
        return x

    def meet_gen(x):
        yield meet(x)

    got = []
    stage = {
        "map": transform(meet, workers=n),
        "flat-map": transform(meet_gen, workers=n),
        "filter": ns.filter(meet, workers=n),
        "sink": sink(meet, workers=n),
    }[kind]
    items = list(range(1, 4 * n + 1))
    if kind == "sink":
        (items | stage).run()
    else:
        got = list(items | stage)
        assert got == items


def test_a_stage_with_one_worker_does_not_overlap():
    active = 0
    peak = 0
    lock = threading.Lock()

    def work(x):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.001)  # work, so that overlapping calls would be seen
        with lock:
            active -= 1
        return x

    assert list(range(20) | transform(work)) == list(range(20))
    assert peak == 1


@pytest.mark.parametrize("executor", ["thread", "async"])
def test_ordered_keeps_input_order_when_later_items_finish_first(executor):
    finished = {i: threading.Event() for i in range(3)}

    def work(x):
        # completion order is forced to 2, 1, 0, then the rest
        if x < 2:
            assert finished[x + 1].wait(WAIT), "items did not run in parallel"
        if x in finished:
            finished[x].set()
        return x * 10

    afinished = {i: asyncio.Event() for i in range(3)}  # bound to the stage's loop on use

    async def awork(x):
        if x < 2:
            await afinished[x + 1].wait()
        if x in afinished:
            afinished[x].set()
        return x * 10

    fn = work if executor == "thread" else awork
    out = list(range(30) | transform(fn, workers=3, ordered=True))
    assert out == [x * 10 for x in range(30)]


def test_unordered_workers_pass_a_fast_item_before_a_slow_one():
    release = threading.Event()

    def work(x):
        if x == 0:
            assert release.wait(WAIT)
        return x

    out = []
    for y in range(5) | transform(work, workers=2, ordered=False):
        out.append(y)
        if len(out) == 4:
            release.set()  # item 0 finishes only after four later items came out
    assert out[:4] == [1, 2, 3, 4]
    assert out[4] == 0


def test_chain_keeps_order():
    inc = transform(lambda x: x + 1, name="inc")
    assert list(range(2000) | inc | inc | ns.filter(lambda x: x % 3)) == [
        x for x in range(2, 2002) if x % 3]


# -- fan-in / fan-out -------------------------------------------------------------------

def test_fan_in_ends_only_after_every_branch_ended():
    hold = threading.Event()
    out = Collector()
    ended = threading.Event()

    @source
    def late():
        yield "late-1"
        assert hold.wait(WAIT)
        yield "late-2"

    @sink(stream=True)
    def record(items):
        for x in items:
            out.add(x)
        ended.set()

    p = (ns.from_iterable(range(50), name="early"), late()) | transform(lambda x: x) | record
    run = p.start()
    try:
        out.wait_for(51)  # everything of the finished branch and late's first item
        assert not ended.is_set(), "the merged stage ended while a branch was still open"
        assert run.join(timeout=0.01) is False
        assert run.running
    finally:
        hold.set()
    assert run.join(WAIT)
    assert ended.is_set()
    assert sorted(map(str, out.items)) == sorted(map(str, [*range(50), "late-1", "late-2"]))
    early = [x for x in out.items if isinstance(x, int)]
    assert early == list(range(50))  # order is kept within a branch


def test_fan_out_broadcasts_every_item_to_every_branch():
    a, b, c = Collector(), Collector(), Collector()
    p = range(300) | transform(lambda x: x * 2) | (
        a.sink("a"), transform(lambda x: -x) | b.sink("b"), ns.filter(lambda x: x % 3 == 0)
        | c.sink("c", workers=3))
    report = p.run()
    assert a.items == [x * 2 for x in range(300)]
    assert b.items == [-x * 2 for x in range(300)]
    assert sorted(c.items) == [x * 2 for x in range(300) if x * 2 % 3 == 0]
    assert report["a"].items_in == 300


# -- the report ---------------------------------------------------------------------------

def test_run_report_counts_per_stage():
    def picky(x):
        if x % 10 == 3:
            raise ValueError(x)
        return x

    def twice(x):
        yield x
        yield x

    p = (range(100) | transform(lambda x: x, name="ident")
         | ns.filter(lambda x: x % 2 == 1, name="odd")
         | transform(twice, name="twice")
         | transform(picky, name="picky", on_error="skip")
         | sink(lambda x: None, name="out", workers=2))
    report = p.run()
    assert report["from_iterable"].items_out == 100
    assert (report["ident"].items_in, report["ident"].items_out) == (100, 100)
    assert (report["odd"].items_in, report["odd"].items_out) == (100, 50)
    assert (report["twice"].items_in, report["twice"].items_out) == (50, 100)
    assert (report["picky"].items_in, report["picky"].items_out,
            report["picky"].errors) == (100, 80, 20)
    assert report["out"].items_in == 80
    assert report.errors == 20
    table = str(report)
    for name in ("from_iterable", "ident", "odd", "twice", "picky", "out"):
        assert name in table
    assert table.splitlines()[0].split() == ["stage", "kind", "in", "out", "errors",
                                             "busy", "s", "items/s"]


def test_run_discards_open_ends_but_counts_them():
    report = (ns.from_iterable(range(10)) | (transform(lambda x: x, name="left"),
                                             transform(lambda x: x, name="right",
                                                       workers=2))).run()
    assert report["left"].items_out == 10
    assert report["right"].items_out == 10


def test_report_counts_pool_stage_errors_and_generator_sources():
    @source
    def gen():
        yield from range(1000)  # a generator: counted per item, not per slice

    report = (gen() | transform(lambda x: 1 // (x % 7), workers=3, on_error="skip",
                                name="div") | sink(lambda x: None)).run()
    assert report["gen"].items_out == 1000
    assert report["div"].errors == len([x for x in range(1000) if x % 7 == 0])
    assert report["div"].items_out == 1000 - report["div"].errors


# -- start / join / stop ----------------------------------------------------------------

def test_start_returns_at_once_and_join_reports_the_end():
    hold = threading.Event()
    out = Collector()

    @source
    def gated():
        yield 1
        assert hold.wait(WAIT)
        yield 2

    run = (gated() | out.sink()).start()
    try:
        out.wait_for(1)
        assert run.running
        assert run in ns.running()
        assert run.join(timeout=0) is False
        assert run.join(timeout=0.01) is False
        assert "running" in repr(run)
    finally:
        hold.set()
    assert run.join(timeout=WAIT) is True
    assert not run.running
    assert run.join() is True  # joining again is fine
    assert out.items == [1, 2]
    assert run not in ns.running()
    assert "finished" in repr(run)
    with pytest.raises(RuntimeError, match="already been started"):
        run.start()


def test_join_raises_the_runs_error():
    run = (range(10) | fail_on(4) | sink(lambda x: None)).start()
    with pytest.raises(ns.StageError) as info:
        run.join(WAIT)
    assert info.value.item == 4
    assert run.error is info.value
    with pytest.raises(ns.StageError):
        run.join(0)  # and again


def test_stop_drain_stops_an_infinite_source_and_flushes_a_stream_stage():
    src = Endless()
    pulled = threading.Event()
    out = []

    @transform(stream=True)
    def hold_all(items):
        buf = []
        for x in items:
            buf.append(x)
            pulled.set()
        yield buf  # the partial state, flushed only at the end of the input

    run = (src.stage() | transform(lambda x: x, workers=2) | hold_all | sink(out.append)).start()
    assert pulled.wait(WAIT)
    run.stop(drain=True)
    assert run.join(0) is True
    assert src.closed.is_set()
    assert len(out) == 1
    assert out[0] == list(range(src.produced)), "drain lost or reordered items"
    assert src.produced >= 1


def test_stop_without_drain_abandons_in_flight_items():
    src = Endless()
    pulled = threading.Event()
    flushed = []
    out = []

    @transform(stream=True)
    def hold_all(items):
        buf = []
        for x in items:
            buf.append(x)
            pulled.set()
        flushed.append(True)
        yield buf

    run = (src.stage() | hold_all | sink(out.append)).start()
    assert pulled.wait(WAIT)
    run.stop(drain=False)
    assert not run.running
    assert run.join(0) is True  # stopped, not failed
    assert src.closed.is_set()
    assert flushed == []
    assert out == []
    assert "stopped" in repr(run)


def test_context_manager_stops_and_joins():
    src = Endless()
    out = Collector()
    with (src.stage() | out.sink()).start() as run:
        out.wait_for(5)
        assert run.running
    assert not run.running
    assert src.closed.is_set()
    assert out.items == list(range(src.produced))  # drained: nothing lost


def test_context_manager_abandons_on_an_exception_in_the_block():
    src = Endless()
    out = Collector()
    run = (src.stage() | out.sink()).start()

    def use_it():
        with run:
            out.wait_for(1)
            raise KeyError("user code failed")

    with pytest.raises(KeyError):
        use_it()
    assert not run.running
    assert src.closed.is_set()


def test_running_and_stop_all():
    a, b = Endless("a"), Endless("b")
    runs = [(a.stage() | sink(lambda x: None)).start(),
            (b.stage() | transform(lambda x: x, workers=2) | sink(lambda x: None)).start()]
    assert ns.running() == runs  # in start order
    assert ns.stop_all() == 2
    assert ns.running() == []
    assert not any(r.running for r in runs)
    assert a.closed.is_set()
    assert b.closed.is_set()
    assert ns.stop_all() == 0


def test_stop_on_a_finished_run_is_a_no_op():
    run = (range(3) | sink(lambda x: None)).start()
    assert run.join(WAIT)
    run.stop()
    run.stop(drain=False)
    assert not run.running


def test_run_stats_are_live():
    hold = threading.Event()
    out = Collector()

    @source
    def gated():
        yield from range(600)
        assert hold.wait(WAIT)

    run = (gated() | transform(lambda x: x, name="mid") | out.sink()).start()
    try:
        out.wait_for(600)
        wait_until(lambda: run.stats()["collect"].items_in == 600, "the sink's count")
        live = run.stats()
        assert live.running
        assert live["mid"].items_in == 600
        assert live["mid"].items_out == 600
        assert live["gated"].items_out == 600
        assert live["collect"].queue.capacity == 1024
        assert live["collect"].queue.queued == 0
        assert live.elapsed > 0
        assert "running for" in str(live)
    finally:
        hold.set()
    assert run.join(WAIT)
    final = run.stats()
    assert not final.running
    assert final.elapsed == run.stats().elapsed  # frozen once ended
    assert "elapsed" in str(final)


def test_run_stats_show_a_full_queue():
    gate = threading.Event()
    started = threading.Event()

    def blocked(x):
        started.set()
        gate.wait(WAIT)

    run = (Endless().stage() | sink(blocked, name="blocked", queue_size=8)).start()
    try:
        assert started.wait(WAIT)
        # one snapshot showing the queue full and the source waiting on it
        snapshots = []

        def full_and_waiting():
            q = run.stats()["blocked"].queue
            snapshots.append(q)
            return q.waiting_producers == 1 and q.queued == 8

        wait_until(full_and_waiting, "a full queue with the source waiting")
        assert snapshots[-1].fill == 1.0
        assert snapshots[-1].capacity == 8
        assert all(s.queued <= 8 for s in snapshots)
    finally:
        gate.set()
        run.stop(drain=False)


# -- iteration and interrupts -------------------------------------------------------------

def test_break_stops_an_infinite_source():
    src = Endless()
    out = []
    for x in src.stage() | transform(lambda x: x * 2) | transform(lambda x: x, workers=2):
        out.append(x)
        if len(out) == 10:
            break
    assert out == [x * 2 for x in range(10)]
    assert src.closed.is_set(), "the source generator's finally did not run"
    assert ns.running() == []


def test_iterating_raises_the_stage_error():
    out = []

    def consume():
        for x in range(100) | fail_on(50):
            out.append(x)

    with pytest.raises(ns.StageError) as info:
        consume()
    assert info.value.item == 50
    assert out == list(range(len(out)))
    assert len(out) <= 50


def test_keyboard_interrupt_during_run_stops_the_pipeline_and_reraises():
    src = Endless()
    sent = threading.Event()

    def interrupt(x):
        if x == 5 and not sent.is_set():
            sent.set()
            _thread.interrupt_main()
        return x

    with pytest.raises(KeyboardInterrupt):
        (src.stage() | transform(interrupt) | sink(lambda x: None)).run()
    assert sent.is_set()
    assert src.closed.is_set()
    assert ns.running() == []


def test_keyboard_interrupt_during_iteration_stops_the_pipeline():
    src = Endless()
    sent = threading.Event()

    def interrupt(x):
        if x == 5 and not sent.is_set():
            sent.set()
            _thread.interrupt_main()
        return x

    p = src.stage() | transform(interrupt, workers=2)
    with pytest.raises(KeyboardInterrupt):
        list(p)
    assert src.closed.wait(WAIT)
    wait_until(lambda: ns.running() == [], "the run to end")


def test_timeout_stops_the_run_and_raises():
    src = Endless()
    with pytest.raises(TimeoutError, match="did not finish within"):
        (src.stage() | sink(lambda x: None)).run(timeout=0.05)
    assert src.closed.is_set()


def test_a_stage_error_before_the_timeout_is_what_run_raises(monkeypatch):
    """A stage failed, and the timeout expired before the failing run had ended: run()
    raises the StageError, not a TimeoutError that hides it (found by the fault tests)."""
    real_join = runtime.Run.join

    def join_times_out_after_the_error(self, timeout=None):
        if timeout is None:
            return real_join(self, timeout)
        wait_until(lambda: self.error is not None, "the stage error")
        return False  # the timeout expires right after the stage failed

    monkeypatch.setattr(runtime.Run, "join", join_times_out_after_the_error)

    def bad(x):
        raise ValueError(x)

    with pytest.raises(ns.StageError, match="stage 'bad' failed on item 0") as info:
        (range(3) | transform(bad, name="bad") | sink(lambda x: None)).run(timeout=60)
    assert isinstance(info.value.__cause__, ValueError)


# -- async -----------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 3, 8])
def test_async_stage_runs_at_most_workers_coroutines_at_once(workers):
    active = 0
    peak = 0
    full = asyncio.Event()

    async def fetch(x):
        nonlocal active, peak
        active += 1  # all coroutines run on one event loop: no lock needed
        peak = max(peak, active)
        if active == workers:
            full.set()
        await full.wait()  # the first ones wait until `workers` are in flight
        await asyncio.sleep(0)
        active -= 1
        return x + 1

    out = list(range(40) | transform(fetch, workers=workers))
    assert out == list(range(1, 41))
    assert peak == workers


def test_async_generator_and_async_sink():
    out = []

    async def expand(x):
        for i in range(x % 3):
            await asyncio.sleep(0)
            yield (x, i)

    async def save(x):
        await asyncio.sleep(0)
        out.append(x)

    (range(20) | transform(expand, workers=4) | sink(save, workers=2)).run()
    assert sorted(out) == [(x, i) for x in range(20) for i in range(x % 3)]


# -- process executor --------------------------------------------------------------------------

def test_process_executor_runs_a_lambda_and_a_closure():
    factor = 7

    def times(x):
        return x * factor

    p = (range(40) | transform(lambda x: x + 1, executor="process")
         | transform(times, executor="process", workers=2))
    assert list(p) == [(x + 1) * factor for x in range(40)]


def test_process_executor_error_is_a_stage_error_with_the_remote_traceback():
    def bad(x):
        if x == 3:
            raise Boom(f"remote {x}")
        return x

    with pytest.raises(ns.StageError) as info:
        (range(10) | transform(bad, executor="process", name="remote")
         | sink(lambda x: None)).run()
    err = info.value
    assert err.stage == "remote"
    assert err.item == 3
    assert type(err.__cause__).__name__ == "Boom"
    assert "remote 3" in str(err.__cause__)
    remote_tb = str(err.__cause__.__cause__)  # the worker's traceback, as text
    assert "Traceback" in remote_tb
    assert "in bad" in remote_tb
    assert "Boom: remote 3" in remote_tb


def test_process_executor_unpicklable_item_is_named():
    lock = threading.Lock()
    items = [*range(300), lock, 301]
    with pytest.raises(ns.StageError) as info:
        (items | transform(lambda x: x, executor="process", name="cpu")
         | sink(lambda x: None)).run()
    err = info.value
    assert err.stage == "cpu"
    assert err.item is lock
    assert "must be picklable" in str(err)
    assert "lock" in str(err)


def test_process_executor_unpicklable_function_is_a_clear_type_error():
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x

    p = range(3) | transform(uses_lock, executor="process", name="locked")
    with pytest.raises(TypeError, match="cannot be pickled") as info:
        p.run()
    assert "'locked'" in str(info.value)
    assert "executor='process'" in str(info.value)


def test_unpicklable_function_leaves_no_thread_of_earlier_stages():
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x

    async def aident(x):
        return x

    p = (range(3) | transform(lambda x: x, workers=3) | transform(aident, workers=2)
         | transform(uses_lock, executor="process"))
    with pytest.raises(TypeError, match="cannot be pickled"):
        p.run()
    assert ns.running() == []
    # the autouse guard then checks that the worker threads already started are gone


# -- retries and error policies --------------------------------------------------------------------

@pytest.fixture
def sleeps(monkeypatch):
    """Record the backoff sleeps of thread stages instead of sleeping."""
    seen: list[float] = []
    lock = threading.Lock()

    def fake_sleep(self, seconds):
        with lock:
            seen.append(seconds)

    monkeypatch.setattr(runtime.Run, "_sleep", fake_sleep)
    return seen


@pytest.mark.parametrize("workers", [1, 3])
def test_retries_with_exponential_backoff(sleeps, workers):
    attempts: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(x):
        with lock:
            attempts[x] = attempts.get(x, 0) + 1
            n = attempts[x]
        if n <= 2:
            raise ConnectionError(f"try {n}")
        return x

    out = list(range(10) | transform(flaky, retries=2, backoff=0.5, workers=workers))
    assert sorted(out) == list(range(10))
    assert attempts == {x: 3 for x in range(10)}
    assert sorted(sleeps) == sorted([0.5, 1.0] * 10)


@pytest.mark.parametrize("workers", [1, 2])
def test_retries_exhausted_raise_the_last_error(sleeps, workers):
    attempts = []

    def always(x):
        attempts.append(x)
        raise ConnectionError(f"attempt {len(attempts)}")

    with pytest.raises(ns.StageError) as info:
        ([42] | sink(always, retries=3, backoff=0.25, name="flaky", workers=workers)).run()
    assert attempts == [42] * 4
    assert sleeps == [0.25, 0.5, 1.0]
    assert info.value.item == 42
    assert str(info.value.__cause__) == "attempt 4"


def test_retries_in_a_process_count_attempts(tmp_path):
    def flaky(x):
        mark = tmp_path / f"{x}"
        n = int(mark.read_text()) + 1 if mark.exists() else 1
        mark.write_text(str(n))
        if n <= 2:
            raise ConnectionError(f"try {n}")
        return x

    out = list(range(4) | transform(flaky, executor="process", retries=2, backoff=0.0))
    assert out == list(range(4))
    assert [int((tmp_path / f"{x}").read_text()) for x in range(4)] == [3] * 4


def test_retries_in_an_async_stage():
    attempts: dict[int, int] = {}

    async def flaky(x):
        attempts[x] = attempts.get(x, 0) + 1
        if attempts[x] <= 1:
            raise ConnectionError("once")
        return x

    out = list(range(6) | transform(flaky, retries=1, backoff=0.001, workers=2))
    assert out == list(range(6))
    assert attempts == {x: 2 for x in range(6)}


@pytest.mark.parametrize("workers", [1, 3])
def test_on_error_callable_receives_item_and_exception(workers):
    calls = []
    lock = threading.Lock()

    def policy(item, exc):
        with lock:
            calls.append((item, type(exc), str(exc)))

    def picky(x):
        if x % 4 == 1:
            raise ValueError(f"no {x}")
        return x

    out = list(range(12) | transform(picky, on_error=policy, workers=workers))
    assert out == [x for x in range(12) if x % 4 != 1]
    assert sorted(calls) == [(x, ValueError, f"no {x}") for x in (1, 5, 9)]


@pytest.mark.parametrize("workers", [1, 3])
def test_on_error_callable_that_raises_becomes_the_stage_error(workers):
    def policy(item, exc):
        raise RuntimeError(f"policy refused {item}")

    with pytest.raises(ns.StageError) as info:
        (range(10) | fail_on(6, name="strict", on_error=policy, workers=workers)
         | sink(lambda x: None)).run()
    err = info.value
    assert err.stage == "strict"
    assert err.item == 6
    assert isinstance(err.__cause__, RuntimeError)
    assert str(err.__cause__) == "policy refused 6"
    assert "on_error callback raised" in str(err)


def test_on_error_skip_drops_exactly_the_failing_items():
    def gen(x):
        yield x
        if x % 5 == 0:
            raise ValueError(x)  # after one output: the whole item is skipped
        yield -x

    out = list(range(20) | transform(gen, on_error="skip"))
    assert out == [y for x in range(20) if x % 5 for y in (x, -x)]


# -- the first error stops everything ---------------------------------------------------------------

def _failing_shapes():
    async def afail(x):
        if x == 30:
            raise Boom("bad item 30")
        return x

    @transform(stream=True, name="fails")
    def stream_fail(items):
        for x in items:
            if x == 30:
                raise Boom("bad item 30")
            yield x

    @sink(stream=True, name="fails")
    def stream_sink_fail(items):
        for x in items:
            if x == 30:
                raise Boom("bad item 30")

    def gen_fail(x):
        yield x
        if x == 30:
            raise Boom("bad item 30")

    def procfail(x):
        if x == 30:
            raise ValueError("bad item 30")
        return x

    nothing = sink(lambda x: None, name="nothing")
    return {
        "chain": lambda s: s | transform(lambda x: x) | fail_on(30) | nothing,
        "sink": lambda s: s | sink(fail_on(30).fn, name="fails"),
        "flat-map": lambda s: s | transform(gen_fail, name="fails") | nothing,
        "filter": lambda s: s | ns.filter(fail_on(30).fn, name="fails") | nothing,
        "fan-out": lambda s: s | (transform(lambda x: x) | nothing,
                                  fail_on(30) | sink(lambda x: None)),
        "fan-out-deep": lambda s: s | (nothing, transform(lambda x: x, workers=2)
                                       | fail_on(30, workers=2) | sink(lambda x: None)),
        "fan-in": lambda s: (s, Endless("other").stage()) | fail_on(30) | nothing,
        "workers": lambda s: s | fail_on(30, workers=4) | nothing,
        "workers-unordered": lambda s: s | fail_on(30, workers=4, ordered=False) | nothing,
        "sink-workers": lambda s: s | sink(fail_on(30).fn, name="fails", workers=3),
        "async": lambda s: s | transform(afail, name="fails", workers=3) | nothing,
        "process": lambda s: s | transform(procfail, name="fails", executor="process")
        | nothing,
        "stream": lambda s: s | stream_fail | nothing,
        "stream-sink": lambda s: s | transform(lambda x: x) | stream_sink_fail,
        "retries": lambda s: s | fail_on(30, retries=2, backoff=0.0) | nothing,
    }


SHAPES = _failing_shapes()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_first_error_stops_an_infinite_pipeline(shape):
    src = Endless()
    p = SHAPES[shape](src.stage())
    with pytest.raises(ns.StageError) as info:
        p.run()
    err = info.value
    assert err.stage == "fails"
    if shape not in ("stream", "stream-sink"):  # a stream stage cannot tell the item
        assert err.item == 30
    assert "bad item 30" in str(err.__cause__)
    assert src.closed.is_set(), "the infinite source was not stopped"
    assert ns.running() == []


def test_a_failing_source_stops_an_infinite_sibling():
    other = Endless("other")

    @source
    def broken():
        yield 1
        yield 2
        raise OSError("disk gone")

    with pytest.raises(ns.StageError) as info:
        ((broken(), other.stage()) | transform(lambda x: x, workers=2)
         | sink(lambda x: None)).run()
    err = info.value
    assert err.stage == "broken"
    assert not err.has_item
    assert isinstance(err.__cause__, OSError)
    assert "disk gone" in str(err)
    assert other.closed.is_set()


def test_a_source_that_cannot_start_is_a_stage_error():
    @source
    def unopenable():
        raise FileNotFoundError("nope.csv")

    with pytest.raises(ns.StageError) as info:
        (unopenable() | sink(lambda x: None)).run()
    assert info.value.stage == "unopenable"
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_ordered_workers_fail_without_waiting_for_an_earlier_slow_item():
    """An error in item 1 must stop the run even while item 0 is still working."""
    holder: dict = {}

    def work(x):
        if x == 0:
            # finishes only once the run is being torn down
            if not holder["run"]._abort_event.wait(WAIT):
                holder["stuck"] = True
            return x
        if x == 1:
            raise Boom("bad item 1")
        return x

    p = range(3) | transform(work, workers=2, ordered=True, name="fails") | sink(lambda x: None)
    run = ns.Run(p)  # what p.start() does, with the run known before any item moves
    holder["run"] = run
    run.start()
    with pytest.raises(ns.StageError) as info:
        run.join(WAIT * 2)
    assert info.value.item == 1
    assert "stuck" not in holder, "the error waited for the earlier, slow item"


def test_a_stage_is_not_called_again_after_the_run_aborted():
    """After the first error, a stage holding a batch does not go on through it."""
    holder: dict = {}
    calls_after_abort = []
    produced_all = threading.Event()
    in_batch = threading.Event()
    go = threading.Event()

    @source
    def items():
        yield from range(100)
        produced_all.set()
        assert go.wait(WAIT)
        yield "boom"

    def slow_sink(x):
        run = holder["run"]
        if run._aborted:
            calls_after_abort.append(x)
        if x == 0:
            assert produced_all.wait(WAIT)  # the queue now holds items 1..99
        elif x == 1:
            in_batch.set()  # working on a batch of up to 99 items
            assert run._abort_event.wait(WAIT)

    def maybe_fail(x):
        if x == "boom":
            raise Boom("bad item boom")

    p = items() | (sink(slow_sink, name="slow"), sink(maybe_fail, name="fails"))
    run = ns.Run(p)
    holder["run"] = run
    run.start()
    assert in_batch.wait(WAIT)
    go.set()
    with pytest.raises(ns.StageError) as info:
        run.join(WAIT)
    assert info.value.stage == "fails"
    assert calls_after_abort == []


# -- stuck stages -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["single", "workers", "async", "stream", "source"])
def test_a_stuck_stage_is_named_in_a_warning_after_the_grace_period(monkeypatch, kind):
    monkeypatch.setattr(runtime, "GRACE", 0.2)
    hold = threading.Event()
    entered = threading.Event()

    def stuck(x):
        entered.set()
        hold.wait(WAIT * 3)  # cannot be interrupted

    async def astuck(x):
        stuck(x)  # blocks the stage's event loop itself

    @sink(stream=True, name="stuck")
    def stream_stuck(items):
        for x in items:
            stuck(x)

    @source(name="stuck")
    def stuck_source():
        yield "boom"
        stuck(None)  # blocked inside the source's own next()

    @source
    def items():
        yield 1
        assert entered.wait(WAIT)
        yield "boom"

    fails = sink(fail_on("boom").fn, name="fails")
    if kind == "source":
        p = stuck_source() | fails
        entered.set()
    else:
        stage = {"single": sink(stuck, name="stuck"),
                 "workers": sink(stuck, name="stuck", workers=3),
                 "async": sink(astuck, name="stuck", workers=2),
                 "stream": stream_stuck}[kind]
        p = items() | (stage, fails)
    try:
        with pytest.warns(RuntimeWarning, match="'stuck'") as warned, \
                pytest.raises(ns.StageError) as info:
            p.run()
        assert info.value.stage == "fails"
        message = str(warned[0].message)
        assert "did not stop within 0.2 s" in message
        assert "'fails'" not in message, "a stage that did stop was named"
        assert ns.running() == []  # abandoned runs are not listed as running
    finally:
        hold.set()  # let the abandoned thread end; the guard then finds nothing left


def test_stop_names_a_stuck_stage_too(monkeypatch):
    monkeypatch.setattr(runtime, "GRACE", 0.2)
    hold = threading.Event()
    entered = threading.Event()

    def stuck(x):
        entered.set()
        hold.wait(WAIT * 3)

    run = (Endless().stage() | sink(stuck, name="stuck")).start()
    try:
        assert entered.wait(WAIT)
        with pytest.warns(RuntimeWarning, match="'stuck'"):
            run.stop(drain=False)
        assert not run.running
    finally:
        hold.set()


def test_async_pool_submit_after_shutdown_leaks_no_coroutine():
    import gc
    import warnings

    from nanostream._pool import AsyncPool, TaskSpec

    async def ident(x):
        return x

    pool = AsyncPool(TaskSpec(ident, "map", 0, 0.0, True), 1, "late")
    pool.shutdown(abort=True)
    pool.join()  # the loop is closed now
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError):
            pool.submit([1])
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


def test_thread_pool_abort_drops_the_chunks_no_worker_started():
    from nanostream._pool import TaskSpec, ThreadPool

    entered = threading.Event()
    hold = threading.Event()
    calls = []

    def work(x):
        calls.append(x)
        if x == 0:
            entered.set()
            hold.wait(WAIT)
        return x

    pool = ThreadPool(TaskSpec(work, "map", 0, 0.0, True), 1, "unit")
    first = pool.submit([0])
    queued = pool.submit([1, 2])
    assert entered.wait(WAIT)
    pool.shutdown(abort=True)
    hold.set()
    assert first.result(WAIT)[0] == [0]  # the chunk in a worker's hands finishes
    assert queued.cancelled()
    pool.join()
    assert pool.alive() == []
    assert calls == [0]


def test_process_pool_replaces_a_dead_worker_without_leaking_its_pipes():
    import gc
    import warnings

    from nanostream._pool import ProcessPool, TaskSpec

    pool = ProcessPool(TaskSpec(abs, "map", 0, 0.0, True), 1, "unit")
    try:
        assert pool.submit([-1]).result(WAIT)[0] == [1]
        victim = pool.alive()[0]
        victim.kill()
        victim.wait()
        assert pool.submit([-2]).result(WAIT)[0] == [2]  # a new worker took over
        assert pool.alive()[0] is not victim
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del victim
            gc.collect()
        assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
    finally:
        pool.shutdown(abort=False)


def test_keyboard_interrupt_between_thread_starts_stops_promptly(monkeypatch):
    """Ctrl-C landing in start() after some stage threads started, before others."""
    monkeypatch.setattr(runtime, "GRACE", 2.0)  # a hang shows as a RuntimeWarning (error)

    class Interrupted(threading.Thread):
        def start(self):
            raise KeyboardInterrupt  # as if Ctrl-C arrived just before this thread's launch

    real_spawn = runtime._Runner.spawn

    def spawn(self, body, suffix=""):
        real_spawn(self, body, suffix)
        if self.name == "last":
            t = self.threads.pop()
            self.threads.append(Interrupted(target=t._target, args=t._args, daemon=True,
                                            name=t.name))

    monkeypatch.setattr(runtime._Runner, "spawn", spawn)
    src = Endless()
    with pytest.raises(KeyboardInterrupt):
        (src.stage() | transform(lambda x: x, workers=2) | sink(lambda x: None, name="last")
         ).run()
    assert src.closed.is_set()
    assert ns.running() == []


@pytest.mark.parametrize("drain", [True, False])
@pytest.mark.parametrize("kind", ["single", "workers", "async"])
def test_a_stage_can_stop_its_own_run(drain, kind):
    """stop() called from inside a stage must not wait for that very stage."""
    src = Endless()
    holder: dict = {}
    asked = threading.Event()

    def stopper(x):
        if x == 10 and not asked.is_set():
            asked.set()
            holder["run"].stop(drain=drain)

    async def astopper(x):
        stopper(x)

    stage = {"single": sink(stopper, name="stopper"),
             "workers": sink(stopper, name="stopper", workers=2),
             "async": sink(astopper, name="stopper", workers=2)}[kind]
    run = ns.Run(src.stage() | stage)
    holder["run"] = run
    run.start()
    # a stop that waited for its own caller would take the grace period and warn
    # (a RuntimeWarning is an error here)
    assert run.join(WAIT)
    assert asked.is_set()
    assert src.closed.is_set()
    assert not run.running


def test_a_dead_worker_process_does_not_blame_an_innocent_item():
    import os

    def fatal(x):
        if x == 150:
            os._exit(3)  # the worker process dies
        return x

    with pytest.raises(ns.StageError) as info:
        (list(range(300)) | transform(fatal, executor="process", name="cpu")
         | sink(lambda x: None)).run()
    err = info.value
    assert err.stage == "cpu"
    assert "died (exit code 3)" in str(err)
    # chunks hold several items by then: the culprit is named, or none is
    assert not err.has_item or err.item == 150, f"blamed item {err.item}"


def test_process_executor_skips_failing_items_in_order():
    def picky(x):
        if x % 7 == 3:
            raise ValueError(x)
        return x * 2

    out = list(range(100) | transform(picky, executor="process", on_error="skip"))
    assert out == [x * 2 for x in range(100) if x % 7 != 3]


def test_stop_drain_with_a_timeout_abandons_a_drain_that_does_not_finish():
    src = Endless()
    holder: dict = {}
    seen = []
    first = threading.Event()

    def slow(x):
        seen.append(x)
        first.set()
        # the work of this sink: it finishes nothing until the run is torn down
        holder["run"]._abort_event.wait(WAIT)

    run = ns.Run(src.stage() | sink(slow, queue_size=8))
    holder["run"] = run
    run.start()
    assert first.wait(WAIT)
    run.stop(drain=True, timeout=0.05)
    assert not run.running
    assert run.join(0) is True
    assert src.closed.is_set()
    assert len(seen) < src.produced  # what was still queued was abandoned


def test_a_context_source_sees_stopping_once_take_wants_no_more():
    from nanostream._stage import Stage

    def waits_for_stop(ctx):
        yield from (1, 2, 3)
        while not ctx.stopping:  # would wait forever if take did not stop the source
            yield_ok.wait(0.01)

    yield_ok = threading.Event()
    src = Stage(waits_for_stop, "source", {"name": "ctxsrc"}, internal={"context": True},
                bound=True)
    assert list(src | ns.take(3)) == [1, 2, 3]


def test_progress_bar_has_its_last_update_when_run_returns(monkeypatch):
    pytest.importorskip("tqdm")
    import nanostream._display as display

    bars = []
    real = display.start_progress

    def spy(run, tqdm_class=None):
        handle = real(run, tqdm_class)
        bars.append(handle)
        return handle

    monkeypatch.setattr(display, "start_progress", spy)
    (range(1000) | sink(lambda x: None)).run(progress=True)
    assert bars
    assert bars[0] is not None
    assert not bars[0].thread.is_alive()
    assert bars[0].bar.n == 1000


def test_a_stream_stage_reads_in_memory_data_itself():
    @transform(stream=True)
    def pairs(items):
        it = iter(items)
        for a in it:
            yield a, next(it, None)

    p = ns.from_iterable(range(5), name="data") | pairs
    run = p.start()
    assert [t.name for t in threading.enumerate() if t.name == "nanostream:data"] == []
    run.join(10)
    assert list(ns.from_iterable(range(5)) | pairs) == [(0, 1), (2, 3), (4, None)]
    report = (ns.from_iterable(range(5), name="data") | pairs).run()
    assert report["data"].items_out == 5
    assert report["pairs"].items_in == 5
    assert report["pairs"].items_out == 3


def test_take_on_huge_in_memory_data_reads_only_what_it_needs():
    assert list(range(10**12) | ns.take(3)) == [0, 1, 2]
    assert list(ns.from_iterable(range(10**12)) | ns.tumbling(size=2) | ns.take(1))[0].value \
        == [0, 1]



def test_no_worker_process_outlives_the_run():
    """run() returns only after every worker process exited and was reaped (it used to
    return as the workers were told to end, leaving them running behind it)."""
    import os

    def exit_slowly(x):  # nested, so shipped by value: the worker imports no test module
        import atexit
        import os
        import time
        atexit.register(time.sleep, 0.3)  # the work of exiting, e.g. flushing a client
        return os.getpid()

    pids = set(list(range(4) | transform(exit_slowly, executor="process")))
    assert pids
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue  # gone, and reaped
        pytest.fail(f"worker process {pid} outlived the run")


def test_an_abort_while_a_worker_process_starts_ends_that_worker_too(monkeypatch):
    """The abort's kill of the pool's processes comes before the starting worker is
    registered: the worker must still end, not take the chunk and run it (here for an
    hour) while the run waits for it."""
    import subprocess

    from nanostream._pool import ProcessPool, TaskSpec

    pool = ProcessPool(TaskSpec(time.sleep, "sink", 0, 0.0, True), 1, "unit")
    real_popen = subprocess.Popen
    aborting: list[threading.Thread] = []

    def popen(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        t = threading.Thread(target=pool.shutdown, args=(True,))
        aborting.append(t)
        t.start()
        # the abort has killed the processes it knew of and told the threads to end
        wait_until(lambda: pool._q.qsize() > 0, "the abort to pass its kill loop")
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen)
    fut = pool.submit([3600])
    try:
        done = threading.Thread(target=pool.join, daemon=True)
        done.start()
        done.join(WAIT)
        assert len(aborting) == 1  # the abort came while the worker was starting
        assert not done.is_alive(), "the worker that started during the abort kept running"
        assert pool.alive() == []
        assert fut.done()
    finally:
        for proc in pool.alive():
            proc.kill()
        for t in aborting:
            t.join(WAIT)
