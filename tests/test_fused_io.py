"""Writer sinks and chunk sources: the runtime's fast path for I/O connectors.

A *writer* sink (``internal={"writer": open_writer}``, what ``kafka_sink`` is) runs in
the thread of the stage before it: ``write(items, tokens)`` is called with each batch,
``tick()`` while no input comes, ``close(ok)`` at the end; it reports items done
(``done(tokens)``) when it chooses, e.g. after a broker acknowledged them. A *chunk*
source (``internal={"chunks": True}``, what ``kafka_source`` is) passes a whole chunk
on with ``ctx.emit(items, on_done)``; the chunk travels under one ticket, and the
single-worker stage after it runs in the source's thread.

Nothing here is Kafka-specific: a recording writer acknowledges in rounds, so that a
chunk's ``on_done`` running too early (before every item derived from it was
acknowledged) is caught whatever the shape downstream.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

import nanostream as ns
from nanostream._stage import SINK, SOURCE, Stage

TIMEOUT = 30


class Journal:
    """What a writer and a chunk source saw, shared by the test and the run's threads."""

    def __init__(self, settle_every: int = 3) -> None:
        self.lock = threading.Lock()
        self.settle_every = settle_every  # writes per acknowledgement round (0: on tick only)
        self.written: list[Any] = []      # items written, acknowledged or not
        self.acked: list[Any] = []        # items acknowledged
        self.threads: set[str] = set()    # threads the writer ran in
        self.closes: list[bool] = []      # close(ok) calls
        self.ticks = 0
        self.done_at: dict[int, list[Any]] = {}  # chunk -> what was acknowledged when it was done
        self.chunk_done = threading.Event()
        self.want_written = 1 << 30       # written_enough is set once this many are written
        self.written_enough = threading.Event()
        self.ack_on_tick = True           # tick() acknowledges what was written
        self.fail_on: Any = object()      # write() raises on this item
        self.bad: Any = object()          # write() reports this item through ctx.item_error


class Writer:
    def __init__(self, done, ctx, journal: Journal) -> None:
        self.done = done
        self.ctx = ctx
        self.j = journal
        self.pending: list[Any] = []
        self.tokens: list[Any] = []
        self.writes = 0

    def write(self, items, tokens):
        j = self.j
        j.threads.add(threading.current_thread().name)
        for i, x in enumerate(items):
            if x == j.fail_on:
                raise ValueError(f"cannot write {x!r}")
            if x == j.bad:
                self.ctx.item_error(ValueError("bad item"), x)
                if tokens is not None:   # skipped: handled at once
                    self.done([tokens[i]])
                continue
            with j.lock:
                j.written.append(x)
                if len(j.written) >= j.want_written:
                    j.written_enough.set()
            self.pending.append(x)
            if tokens is not None:
                self.tokens.append(tokens[i])
        self.writes += 1
        if j.settle_every and self.writes % j.settle_every == 0:
            self.settle()

    def settle(self):
        with self.j.lock:
            self.j.acked.extend(self.pending)
        self.pending = []
        tokens, self.tokens = self.tokens, []
        if tokens:
            self.done(tokens)

    def tick(self):
        self.j.ticks += 1
        if self.j.ack_on_tick:
            self.settle()

    def close(self, ok):
        self.j.closes.append(ok)
        if ok:
            self.settle()


def _direct(items, *, journal, ctx=None):   # the function a direct call would run
    raise AssertionError("the runtime drives writers through internal['writer']")


def writer_sink(journal: Journal, name: str = "writer", **options: Any) -> Stage:
    def open_writer(done, *, ctx, journal):
        return Writer(done, ctx, journal)
    return Stage(_direct, SINK, {"name": name, "stream": True, **options},
                 kwargs={"journal": journal},
                 internal={"writer": open_writer, "tick": 0.005, "context": True})


def chunk_source(chunks: list[list[int]], journal: Journal, *, track: bool = True,
                 hold: threading.Event | None = None, name: str = "chunks") -> Stage:
    """Emits each chunk with ``ctx.emit``; with ``hold``, then waits (idle, ticking the
    stages in its thread) until ``hold`` is set or the run stops."""

    def read(ctx=None):
        for i, chunk in enumerate(chunks):
            def on_done(i=i):
                with journal.lock:
                    journal.done_at[i] = list(journal.acked)
                journal.chunk_done.set()
            if not ctx.emit(list(chunk), on_done):
                return ()
        while hold is not None and not hold.is_set() and not ctx.stopping:
            ctx.idle()
            hold.wait(0.005)
        return ()

    return Stage(read, SOURCE, {"name": name, "track": track},
                 internal={"context": True, "chunks": True})


def chunks_of(n: int, size: int) -> list[list[int]]:
    """Items ``100 * chunk + position``: an item's chunk is ``item // 100``."""
    return [[100 * c + k for k in range(size)] for c in range(n)]


def origins(out: Any) -> set[int]:
    if isinstance(out, list):
        return {x // 100 for x in out}
    if hasattr(out, "value"):
        return {x // 100 for x in out.value}
    return {out // 100}


def assert_done_after_acked(j: Journal, n_chunks: int) -> None:
    """Each chunk was done only once everything derived from it was acknowledged."""
    assert sorted(j.done_at) == list(range(n_chunks))
    for c, snapshot in j.done_at.items():
        derived = Counter(repr(o) for o in j.acked if c in origins(o))
        at_done = Counter(repr(o) for o in snapshot if c in origins(o))
        assert derived == at_done, f"chunk {c} was done before all of its outputs were acked"


SHAPES = {
    "map": (lambda: ns.transform(lambda x: x + 1), lambda xs: [x + 1 for x in xs]),
    "filter": (lambda: ns.filter(lambda x: x % 3 == 0), lambda xs: [x for x in xs if x % 3 == 0]),
    "flat_map": (lambda: ns.flat_map(lambda x: [x, x] if x % 2 else []),
                 lambda xs: [y for x in xs for y in ([x, x] if x % 2 else [])]),
    "batch": (lambda: ns.batch(7), lambda xs: [xs[i:i + 7] for i in range(0, len(xs), 7)]),
    "window": (lambda: ns.tumbling(size=5) | ns.transform(lambda w: list(w.value)),
               lambda xs: [xs[i:i + 5] for i in range(0, len(xs), 5)]),
    "workers": (lambda: ns.transform(lambda x: x * 2, workers=3, ordered=False),
                lambda xs: [x * 2 for x in xs]),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_chunk_is_done_only_after_everything_from_it_is_acknowledged(shape):
    """One ticket per chunk, counted down through filters, flat-maps, batches, windows
    and out-of-order workers; the writer acknowledges in rounds, after writing."""
    j = Journal(settle_every=2)
    chunks = chunks_of(6, 23)
    make, expect = SHAPES[shape]
    report = (chunk_source(chunks, j) | make() | writer_sink(j)).run(timeout=TIMEOUT)
    want = expect([x for c in chunks for x in c])
    assert Counter(map(repr, j.acked)) == Counter(map(repr, want))
    assert_done_after_acked(j, len(chunks))
    assert j.closes == [True]
    assert report["writer"].items_in == len(want)


def test_the_chain_after_a_chunk_source_runs_in_the_source_thread():
    """chunk source | transform | writer is one thread, like the hand-written loop."""
    j = Journal()
    seen: set[str] = set()

    def note(x):
        seen.add(threading.current_thread().name)
        return x

    (chunk_source(chunks_of(3, 10), j, name="src") | ns.transform(note)
     | writer_sink(j)).run(timeout=TIMEOUT)
    assert seen == j.threads == {"nanostream:src"}
    assert_done_after_acked(j, 3)


def test_a_writer_runs_fused_into_the_stage_before_it():
    """Behind a plain source the writer shares the transform's thread (no queue)."""
    j = Journal()
    seen: set[str] = set()

    def note(x):
        seen.add(threading.current_thread().name)
        return x

    (ns.from_iterable(iter(range(50))) | ns.transform(note, name="t") | writer_sink(j)
     ).run(timeout=TIMEOUT)
    assert seen == j.threads == {"nanostream:t"}
    assert sorted(j.acked) == list(range(50))
    assert j.closes == [True]


def test_an_idle_writer_is_ticked_so_it_acknowledges_without_more_input():
    """The source holds its last chunk open: the chunk is done through the writer's idle
    ticks alone (the writer settles on tick only here), in the fused and in the
    separate-thread case."""
    for fused in (True, False):
        j = Journal(settle_every=0)
        hold = threading.Event()
        src = chunk_source([[1, 2, 3]], j, hold=hold)
        mid = ns.transform(lambda x: x) if fused else ns.transform(lambda x: x, workers=2)
        run = (src | mid | writer_sink(j)).start()
        try:
            assert j.chunk_done.wait(TIMEOUT), "the writer was never ticked"
            assert j.ticks > 0
            assert sorted(j.acked) == [1, 2, 3]
        finally:
            hold.set()
            run.join(timeout=TIMEOUT)


def test_a_failing_writer_is_a_stage_error_naming_the_sink_and_is_closed_as_failed():
    for fused in (True, False):
        j = Journal()
        j.fail_on = 205
        mid = ns.transform(lambda x: x, name="mid") if fused else \
            ns.transform(lambda x: x, workers=2, name="mid")
        with pytest.raises(ns.StageError) as info:
            (chunk_source(chunks_of(4, 10), j) | mid | writer_sink(j, name="out")
             ).run(timeout=TIMEOUT)
        assert info.value.stage == "out"
        assert "cannot write 205" in str(info.value.__cause__)
        assert j.closes == [False]
        assert 2 not in j.done_at
        assert 3 not in j.done_at


def test_on_error_skip_applies_to_what_the_writer_reports():
    j = Journal()
    j.bad = 104
    report = (chunk_source(chunks_of(3, 10), j) | writer_sink(j, on_error="skip")
              ).run(timeout=TIMEOUT)
    assert 104 not in j.written
    assert len(j.acked) == 29
    assert report["writer"].errors == 1
    assert_done_after_acked(j, 3)   # the skipped item counts as handled


def test_stop_with_drain_closes_the_writer_and_acknowledges_what_was_written():
    j = Journal(settle_every=0)   # acknowledges on close only
    j.ack_on_tick = False
    j.want_written = 10
    hold = threading.Event()
    run = (chunk_source(chunks_of(2, 5), j, hold=hold) | ns.transform(lambda x: x)
           | writer_sink(j)).start()
    try:
        assert j.written_enough.wait(TIMEOUT)
        run.stop(drain=True)
        assert run.join(timeout=TIMEOUT)
    finally:
        hold.set()
    assert j.closes == [True]
    assert sorted(j.acked) == sorted(x for c in chunks_of(2, 5) for x in c)
    assert_done_after_acked(j, 2)


def test_stop_without_drain_abandons_what_was_not_acknowledged():
    j = Journal(settle_every=0)   # acknowledges on close only
    j.ack_on_tick = False
    j.want_written = 10
    hold = threading.Event()
    run = (chunk_source(chunks_of(2, 5), j, hold=hold) | ns.transform(lambda x: x)
           | writer_sink(j)).start()
    try:
        assert j.written_enough.wait(TIMEOUT)
        run.stop(drain=False)
        run.join(timeout=TIMEOUT)
    finally:
        hold.set()
    assert j.closes == [False]
    assert j.acked == []
    assert j.done_at == {}


def test_fan_out_to_a_writer_and_another_sink():
    """The chunk is done once both branches handled its items; the writer, fed by a
    fan-out, runs in a thread of its own."""
    j = Journal(settle_every=2)
    got: list[int] = []

    def plain(x):
        got.append(x)

    chunks = chunks_of(5, 17)
    (chunk_source(chunks, j) | (writer_sink(j, name="w"), ns.sink(plain))).run(timeout=TIMEOUT)
    assert sorted(got) == sorted(j.acked) == sorted(x for c in chunks for x in c)
    assert j.threads == {"nanostream:w"}
    assert_done_after_acked(j, len(chunks))


def test_untracked_runs_pass_no_tokens():
    j = Journal()
    seen_tokens: list[Any] = []

    class Spy(Writer):
        def write(self, items, tokens):
            seen_tokens.append(tokens)
            super().write(items, tokens)

    def open_spy(done, *, ctx, journal):
        return Spy(done, ctx, journal)

    stage = Stage(_direct, SINK, {"name": "spy", "stream": True}, kwargs={"journal": j},
                  internal={"writer": open_spy, "tick": 0.01, "context": True})
    (chunk_source(chunks_of(2, 4), j, track=False) | stage).run(timeout=TIMEOUT)
    assert seen_tokens
    assert all(t is None for t in seen_tokens)
    assert j.done_at == {}   # untracked: no completion callbacks at all
    assert sorted(j.acked) == [0, 1, 2, 3, 100, 101, 102, 103]


def test_a_writer_behind_in_memory_data_and_with_no_items():
    j = Journal()
    (ns.from_iterable([3, 1, 2]) | writer_sink(j)).run(timeout=TIMEOUT)
    assert sorted(j.acked) == [1, 2, 3]
    assert j.closes == [True]
    j = Journal()
    (ns.from_iterable([]) | writer_sink(j)).run(timeout=TIMEOUT)
    assert j.acked == []
    assert j.closes == [True]


def test_every_shape_unfused_too(monkeypatch):
    """With fusion off (each stage its own thread) the same guarantees hold."""
    monkeypatch.setattr(ns.Run, "fuse", False)
    j = Journal(settle_every=2)
    chunks = chunks_of(4, 11)
    (chunk_source(chunks, j) | ns.flat_map(lambda x: [x, x]) | ns.batch(6)
     | writer_sink(j)).run(timeout=TIMEOUT)
    assert len(j.threads) == 1
    assert "nanostream:writer" in j.threads
    assert sum(len(b) for b in j.acked) == 2 * 44
    assert_done_after_acked(j, len(chunks))



# -- a chunk as a plain list through fused maps into a writer -------------------------
# (SourceContext.emit -> _SingleRunner.handle_chunk: no (item, ticket) pair per item)

class TicketsSeen:
    """Wraps the writer's ``write`` to record how many distinct tokens each call had."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.per_write: list[int] = []
        write = Writer.write

        def recording(writer, items, tokens):
            if tokens is not None:
                self.per_write.append(len({id(t) for t in tokens}))
            return write(writer, items, tokens)
        monkeypatch.setattr(Writer, "write", recording)


def test_a_chunk_flows_through_fused_maps_to_the_writer_under_its_one_ticket(monkeypatch):
    seen = TicketsSeen(monkeypatch)
    j = Journal(settle_every=2)
    chunks = chunks_of(5, 17)
    report = (chunk_source(chunks, j) | ns.transform(lambda x: x + 1, name="a")
              | ns.transform(lambda x: x - 1, name="b") | writer_sink(j)).run(timeout=TIMEOUT)
    assert sorted(j.acked) == sorted(x for c in chunks for x in c)
    assert seen.per_write == [1] * len(chunks)   # one write per chunk, all one ticket
    assert_done_after_acked(j, len(chunks))
    assert report["a"].items_in == report["b"].items_out == report["writer"].items_in == 85


def test_a_map_that_skips_items_mid_chunk_counts_them_down_from_the_ticket():
    """Skipped items are handled: each chunk is done once the rest is acknowledged, a
    chunk whose every item fails is done too, and the errors are counted."""
    def f(x):
        if x // 100 == 2 or x % 7 == 3:
            raise ValueError(x)
        return x

    j = Journal(settle_every=2)
    chunks = chunks_of(5, 17)
    report = (chunk_source(chunks, j) | ns.transform(f, on_error="skip", name="f")
              | writer_sink(j)).run(timeout=TIMEOUT)
    want = [x for c in chunks for x in c if x // 100 != 2 and x % 7 != 3]
    assert sorted(j.acked) == want
    assert_done_after_acked(j, len(chunks))
    assert report["f"].errors == 85 - len(want)
    assert report["f"].items_out == report["writer"].items_in == len(want)


def test_a_map_with_retries_over_a_chunk_passes_every_item_on():
    failed: set[int] = set()

    def flaky(x):
        if x % 5 == 0 and x not in failed:
            failed.add(x)
            raise ValueError(x)
        return -x

    j = Journal(settle_every=2)
    chunks = chunks_of(3, 12)
    (chunk_source(chunks, j) | ns.transform(flaky, retries=1, backoff=0)
     | writer_sink(j)).run(timeout=TIMEOUT)
    assert sorted(j.acked) == sorted(-x for c in chunks for x in c)
    assert_done_after_acked(j, len(chunks))


def test_a_map_that_fails_mid_chunk_under_raise_leaves_the_chunk_not_done():
    def f(x):
        if x == 205:
            raise ValueError("no 205")
        return x

    j = Journal(settle_every=1)
    with pytest.raises(ns.StageError) as info:
        (chunk_source(chunks_of(4, 10), j) | ns.transform(f, name="f")
         | writer_sink(j)).run(timeout=TIMEOUT)
    assert info.value.stage == "f"
    assert info.value.item == 205
    assert sorted(j.done_at) == [0, 1]   # before the failure; 2 (and 3) never
    assert_done_after_acked(j, 2)
    assert not any(x // 100 >= 2 for x in j.acked)


def test_a_filter_after_a_chunk_map_gets_pairs_and_counts_exactly():
    j = Journal(settle_every=2)
    chunks = chunks_of(4, 15)
    (chunk_source(chunks, j) | ns.transform(lambda x: x * 2)
     | ns.filter(lambda x: x % 3 == 0) | ns.transform(lambda x: x // 2)
     | writer_sink(j)).run(timeout=TIMEOUT)
    assert sorted(j.acked) == sorted(x for c in chunks for x in c if x * 2 % 3 == 0)
    assert_done_after_acked(j, len(chunks))
