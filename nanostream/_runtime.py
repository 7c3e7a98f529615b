"""The threaded executor: one thread per stage, bounded channels between them."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from ._channel import Aborted, Channel
from ._errors import StageError
from ._pool import AsyncPool, ProcessPool, TaskSpec, ThreadPool, bind, run_chunk
from ._report import Report, StageStats
from ._stage import SINK, SOURCE, Stage, repr_short
from ._tracking import Ticket, group, release, release_all, retain

if TYPE_CHECKING:
    from ._graph import Node, Pipeline

__all__ = ["Run", "running", "stop_all"]

log = logging.getLogger("nanostream")

BATCH = 1024           # most items a stage takes from its queue at once
BATCH_SECONDS = 0.002  # how long a batch of a single-worker stage should take
SPLIT_AFTER = 8        # items seen on both sides before a fused link may split
SPLIT_COST = 50e-6     # seconds per item on both sides of a fused link that split it
MEMORY_SLICE = 4096    # most items a stream stage reads at once from in-memory data
GRACE = 5.0            # seconds a stage may take to notice a stop before it is named
_RUNS: set[Run] = set()
_RUNS_LOCK = threading.Lock()

# Iterables that live in memory: a source over one of these is read in slices
# (C speed) since taking the next item can never block.
_MEMORY_TYPES = (list, tuple, range, str, bytes, bytearray, dict, set, frozenset, deque)
_EMPTY: tuple[Any, ...] = ([], (), range(0), "", b"", bytearray(), {}, set(), frozenset(),
                           deque(), {}.values(), {}.items(), reversed([]), reversed(range(0)))
_MEMORY_ITERS: tuple[type, ...] = tuple({type(iter(x)) for x in _EMPTY})


def _check_timeout(fn: str, timeout: Any) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{fn}: timeout must be a number of seconds or None, got "
                        f"{type(timeout).__name__} {timeout!r}")
    if not timeout >= 0:
        raise ValueError(f"{fn}: timeout must be >= 0 seconds (or None to wait as long as it "
                         f"takes), got {timeout!r}")


def running() -> list[Run]:
    """The runs that are still going (started and not yet ended).

    >>> running()
    []
    """
    with _RUNS_LOCK:
        return sorted(_RUNS, key=lambda r: r._started_at)


def stop_all(drain: bool = True) -> int:
    """Stop every live run (e.g. the ones an earlier notebook cell started).

    Returns how many runs were stopped.

    >>> stop_all()
    0
    """
    runs = running()
    for r in runs:
        r.stop(drain=drain)
    return len(runs)


class _ItemFailure(Exception):
    def __init__(self, item: Any, exc: BaseException) -> None:
        self.item = item
        self.exc = exc


class _Failed(Exception):
    """Carries a ready StageError out of a stage thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _StageErrors:
    """``with _StageErrors(name):`` turns what the stage's code raises into the
    :class:`_Failed` that ends the run: a StageError as it is, any other exception as
    a StageError naming the stage; the runtime's own signals pass through."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if exc is None or isinstance(exc, (_Failed, Aborted)) or \
                not isinstance(exc, Exception):
            return
        if isinstance(exc, StageError):
            raise _Failed(exc) from None
        raise _Failed(StageError(self.name, exc=exc)) from None


class _Slots:
    """A counting semaphore that gives up when the run aborts."""

    def __init__(self, n: int, run: Run) -> None:
        self._free = n
        self._cond = threading.Condition()
        self._run = run
        run._wakeables.append(self)

    def acquire(self) -> None:
        with self._cond:
            while self._free <= 0:
                if self._run._aborted:
                    raise Aborted
                self._cond.wait()
            if self._run._aborted:
                raise Aborted
            self._free -= 1

    def release(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify()

    def abort(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _noop() -> None:
    return None


class SourceContext:
    """Given to internal stages that ask for it (``internal={"context": True}``):
    sources get it as ``ctx=``, and so do ``stream=True`` stages.

    It lets them watch for a stop request, report per-item errors under the
    stage's *effective* ``on_error`` (after ``with_options`` too; counted in the
    report), sleep without delaying an abort, and run code once the run ended.
    """

    def __init__(self, runner: _Runner) -> None:
        self._runner = runner
        self.name = runner.name

    def sleep(self, seconds: float) -> None:
        """Sleep, but give up at once (raising an internal abort) when the run aborts."""
        flush = getattr(self._runner, "flush", None)
        if flush is not None:
            flush()  # nothing waits in an output buffer while the stage sleeps
        self._runner.run._sleep(seconds)

    @property
    def stopping(self) -> bool:
        """True once the stage should end: a stop was requested, the run aborted, or
        nothing downstream takes items any more (e.g. after ``ns.take``)."""
        r = self._runner
        return r.stop_requested or r.run._aborted or r.dead()

    def on_run_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the whole run has ended: after every stage thread
        finished (end of stream, stop, or failure), before ``join()`` returns.

        For what must wait until the items the source emitted are done downstream,
        e.g. a final offset commit, then closing the client. It runs in the thread
        that finished last; an exception it raises is logged, not raised. It does
        not run when a stage is stuck past the grace period (that thread may still
        be using the resource).
        """
        self._runner.run._on_end.append(callback)

    def emit(self, items: list[Any], on_done: Callable[[], object] | None = None) -> bool:
        """Pass a chunk of items on at once (a source that reads in chunks, such as
        Kafka's polls, calls this and returns an empty iterable). A source with
        ``internal={"chunks": True}`` promises to emit only so; a single-worker
        stage after it then runs in the source's thread (fused, called with each
        chunk), like the hand-written poll-process loop.

        In a tracked run (``track=True``) the whole chunk travels under ONE ticket
        that counts its items down: ``on_done()`` runs once every item of the chunk,
        and all that was derived from them, is handled (an empty chunk is done at
        once). Tracking then costs per chunk, not per item. Blocks while the stages
        after the source are full; returns False once the pipeline wants no more
        items (a stop was requested, the run aborted, or nothing downstream takes
        them).
        """
        r = self._runner
        if r.tracked:
            if items:
                ticket = Ticket(on_done, len(items)) if on_done is not None else None
                nxt = getattr(r, "fused_next", None)
                if nxt is not None and nxt.takes_chunks:
                    nxt.handle_chunk(items, ticket)   # no (item, ticket) pair per item
                else:
                    r.emit(list(zip(items, repeat(ticket))))
            elif on_done is not None:
                on_done()
        elif items:
            r.emit(items)
        r.items_out += len(items)
        return not (r.stop_requested or r.run._aborted or r.dead())

    def idle(self) -> None:
        """A chunk source calls this when it has had nothing to emit for a while (an
        empty poll): the stages running in its thread get their idle tick (a writer
        sink settles what it has sent)."""
        nxt = getattr(self._runner, "fused_next", None)
        if nxt is not None:
            for r in nxt._chain():
                if isinstance(r, _WriterRunner):
                    r.tick()

    def item_error(self, exc: BaseException, item: Any = None, detail: str | None = None) -> None:
        """Apply ``on_error`` to an error tied to one item the source could not produce.

        Raises :class:`StageError` under ``"raise"``; returns (the item is dropped)
        under ``"skip"`` or after calling a callable policy.
        """
        r = self._runner
        policy = r.stage.option("on_error")
        r.errors += 1
        if policy == "raise":
            raise _Failed(StageError(r.name, item, exc, detail=detail))
        if policy != "skip":
            try:
                policy(item, exc)
            except Exception as cb_exc:
                raise _Failed(StageError(r.name, item, cb_exc,
                                         detail="the on_error callback raised")) from None


StageContext = SourceContext


# -----------------------------------------------------------------------------

class _Runner:
    """The code that runs one node in its thread(s)."""

    kind = "node"

    def __init__(self, run: Run, node: Node, inp: Channel | None) -> None:
        self.run = run
        self.node = node
        self.stage: Stage = node.stage
        self.name = node.stage.name
        self.inp = inp
        self.outs: list[tuple[Channel, bool]] = []
        self.tracked = False
        self.items_in = 0
        self.items_out = 0
        self.errors = 0
        self.busy = 0.0
        self.threads: list[threading.Thread] = []
        self.stop_requested = False
        self.call = bind(self.stage.fn, self.stage.kwargs)
        self.emit: Callable[[list[Any]], None] = _discard
        self.outbuf: list[Any] = []  # stream stages with ctx buffer their outputs here

    # output ----------------------------------------------------------------

    def setup_emit(self) -> None:
        outs = self.outs
        if not outs:
            self.emit = self._emit_nowhere if self.tracked else _discard
        elif len(outs) == 1 and not outs[0][1]:
            self.emit = outs[0][0].put_many
        else:
            self.emit = self._emit_fanout

    def _emit_nowhere(self, items: list[Any]) -> None:
        release([t for _, t in items])

    def _emit_fanout(self, items: list[Any]) -> None:
        if self.tracked and len(self.outs) > 1:
            retain([t for _, t in items], len(self.outs) - 1)
        for ch, wrap in self.outs:
            ch.put_many([(x, None) for x in items] if wrap else items)

    def dead(self) -> bool:
        """Nothing downstream takes this stage's items any more."""
        return self.outs_dead()

    def outs_dead(self) -> bool:
        """Every consumer downstream asked for no more items (e.g. ``take``)."""
        return bool(self.outs) and all(ch.discarding for ch, _ in self.outs)

    def close_outs(self) -> None:
        for ch, _ in self.outs:
            ch.close()

    # thread plumbing -------------------------------------------------------

    def spawn(self, body: Callable[[], None], suffix: str = "") -> None:
        t = threading.Thread(target=self._main, args=(body,), daemon=True,
                             name=f"nanostream:{self.name}{suffix}")
        self.threads.append(t)

    def _main(self, body: Callable[[], None]) -> None:
        if not self.run._check_in():
            return  # start() was interrupted (Ctrl-C) before this thread checked in
        try:
            body()
        except Aborted:
            pass
        except _Failed as f:
            self.run._fail(f.error)
        except _ItemFailure as f:
            self.run._fail(StageError(self.name, f.item, f.exc))
        except BaseException as exc:
            self.run._fail(StageError(self.name, exc=exc))
        finally:
            self.run._thread_done()

    def start(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once when the node is done: close what it feeds."""
        self.close_outs()

    batch: list[Any] | None = None  # the batch being handled, if any

    def on_abort(self) -> None:
        batch = self.batch
        if batch:
            batch.clear()  # the rest of the batch is abandoned: no more calls after an abort

    def stats(self) -> StageStats:
        return StageStats(self.name, self.stage.kind, self.stage.option("workers")
                          if self.stage.kind != SOURCE else 1,
                          self.items_in, self.items_out, self.errors, self.busy,
                          self.inp.stats() if self.inp is not None else None)

    # errors ----------------------------------------------------------------

    def handle_error(self, item: Any, exc: BaseException) -> None:
        """Apply ``on_error`` to one failed item (after retries)."""
        self.errors += 1
        policy = self.stage.option("on_error")
        if policy == "raise":
            raise _Failed(StageError(self.name, item, exc))
        if policy == "skip":
            log.debug("stage %r skipped item %r: %r", self.name, item, exc)
            return
        try:
            policy(item, exc)
        except Exception as cb_exc:
            err = StageError(self.name, item, cb_exc, detail="the on_error callback raised")
            raise _Failed(err) from None


_first = itemgetter(0)
_second = itemgetter(1)


def _remaining(it: Iterator[Any]) -> int:
    """How many items a list iterator has left (to find the item a C loop failed on)."""
    return it.__length_hint__()  # type: ignore[attr-defined]


def _discard(items: list[Any]) -> None:
    return None


# -- sources --------------------------------------------------------------------

class _SourceRunner(_Runner):
    kind = "source"
    fused_next: _SingleRunner | None = None  # set for in-memory data feeding one stage
    read_by: _StreamRunner | None = None     # in-memory data a stream stage reads itself

    def start(self) -> None:
        self.setup_emit()
        if self.fused_next is not None:
            self.emit = self.fused_next.handle
        if self.read_by is None:
            self.spawn(self._body_chunks if self.stage.internal.get("chunks")
                       and self.fused_next is not None else self._body)

    def _body_chunks(self) -> None:
        """A chunk source with stages fused after it: the writer sinks among them
        are opened in this thread first (a bad address fails the run at once)."""
        assert self.fused_next is not None
        for r in self.fused_next._chain():
            if isinstance(r, _WriterRunner):
                r.open()
        self._body()

    def dead(self) -> bool:
        nxt = self.fused_next
        return nxt.dead() if nxt is not None else self.outs_dead()

    def finish(self) -> None:
        self.close_outs()
        if self.fused_next is not None:
            self.fused_next.finish()

    def _open(self) -> Any:
        st = self.stage
        if st.internal.get("context"):
            return st.fn(*st.args, ctx=SourceContext(self), **st.kwargs)
        return st.fn(*st.args, **st.kwargs)

    def _body(self) -> None:
        it: Any = None
        try:
            try:
                obj = self._open()
                it = iter(obj)
            except (_Failed, Aborted):
                raise
            except Exception as exc:
                raise _Failed(StageError(self.name, exc=exc)) from None
            if self.stage.option("track"):
                self._pump_tracked(it)
            elif isinstance(obj, _MEMORY_TYPES) or type(it) in _MEMORY_ITERS:
                self._pump_slices(it)
            else:
                self._pump_items(it)
            self.finish()
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing source %r failed", self.name)

    def _pump_slices(self, it: Iterator[Any]) -> None:
        emit = self.emit
        fused = self.fused_next is not None
        perf = time.perf_counter
        limit = 16 if fused else BATCH
        while not self.stop_requested:
            chunk = list(islice(it, limit))
            if not chunk:
                return
            self.items_out += len(chunk)
            t0 = perf()
            emit(chunk)
            if fused:  # batches sized like a single-worker stage's (see _SingleRunner._body)
                per_item = (perf() - t0) / len(chunk)
                want = int(BATCH_SECONDS / per_item) if per_item > 0 else BATCH
                limit = max(1, min(BATCH, want, 2 * limit))
            if self.dead():
                return

    def _pump_items(self, it: Iterator[Any]) -> None:
        if len(self.outs) == 1 and not self.outs[0][1]:
            ch = self.outs[0][0]
            put = ch.put
            for x in self._guarded(it):
                self.items_out += 1  # per item: a slow source's count must be live
                put(x)
                if self.stop_requested or ch.discarding:
                    return
        else:
            emit = self.emit
            for x in self._guarded(it):
                self.items_out += 1
                emit([x])
                if self.stop_requested or self.outs_dead():
                    return

    def _pump_tracked(self, it: Iterator[Any]) -> None:
        emit = self.emit
        for pair in self._guarded(it):
            try:
                x, on_done = pair
            except (TypeError, ValueError):
                raise _Failed(StageError(self.name, pair, TypeError(
                    "a source with track=True must yield (item, on_done) pairs, "
                    f"got {type(pair).__name__}"))) from None
            self.items_out += 1
            emit([(x, Ticket(on_done) if on_done is not None else None)])
            if self.stop_requested or self.outs_dead():
                return

    def _guarded(self, it: Iterator[Any]) -> Iterator[Any]:
        """Iterate the user's iterator, turning its exceptions into StageErrors."""
        nxt = it.__next__
        while True:
            try:
                x = nxt()
            except StopIteration:
                return
            except (_Failed, Aborted):
                raise
            except Exception as exc:
                raise _Failed(StageError(self.name, exc=exc)) from None
            yield x


# -- per-item stages in one thread ------------------------------------------------

class _SingleRunner(_Runner):
    """A per-item transform, filter or sink with one worker in a thread.

    Chains of such stages are *fused*: the downstream stage runs in the upstream
    stage's thread, called directly with each output batch instead of through a
    queue (one thread hop instead of several, which is what makes cheap stages
    fast under the GIL). A fused link splits into two threads on its own once
    both sides turn out to be slow per item (I/O or heavy work), so that slow
    stages still overlap; what the user observes does not change.
    """

    kind = "single"
    fused_next: _SingleRunner | None = None
    fused_prev: _SingleRunner | None = None
    takes_chunks = False   # handle_chunk() works here (a tracked map, a writer)
    process_chunk: Callable[[list[Any], Ticket | None], list[Any]]

    def start(self) -> None:
        self.setup_emit()
        st = self.stage
        simple = st.option("on_error") == "raise" and st.option("retries") == 0
        flavor = st.flavor
        if self.tracked and flavor == "map":
            self.takes_chunks = True
            self.process_chunk = self._fast_map_chunk if simple else self._careful_map_chunk
        if self.tracked and simple and flavor == "map":
            self.process = self._fast_map_tracked
        elif self.tracked:
            self.process = self._process_tracked
        elif simple:
            self.process = {"map": self._fast_map, "filter": self._fast_filter,
                            "sink": self._fast_sink, "flatmap": self._fast_flatmap}[flavor]
        else:
            self.process = self._process_careful
        if self.fused_next is not None:
            self.emit = self.fused_next.handle
        if self.fused_prev is None:
            self.spawn(self._body)

    def _chain(self) -> Iterator[_SingleRunner]:
        """This stage and the stages fused after it (run in this stage's thread)."""
        r: _SingleRunner | None = self
        while r is not None:
            yield r
            r = r.fused_next

    def _body(self) -> None:
        """The thread body for this stage's fused chain. Writer sinks in the chain (see
        :class:`_WriterRunner`) are opened in this thread first, and ticked whenever no
        input came for their tick interval."""
        writers = [r for r in self._chain() if isinstance(r, _WriterRunner)]
        for w in writers:
            w.open()
        tick = min((w.tick_every for w in writers), default=None)
        get = self.inp.get  # type: ignore[union-attr]
        handle = self.handle
        perf = time.perf_counter
        limit = 16
        while True:
            batch = get(limit, tick)
            if batch is None:
                break
            if not batch:   # (only with a tick: nothing came for that long)
                for r in self._chain():   # (a writer may have split off since)
                    if isinstance(r, _WriterRunner):
                        r.tick()
                continue
            t0 = perf()
            handle(batch)
            # size the next batch so that one takes about BATCH_SECONDS: cheap stages
            # get big batches, slow ones single items (so slow stages still pipeline)
            per_item = (perf() - t0) / len(batch)
            want = int(BATCH_SECONDS / per_item) if per_item > 0 else BATCH
            limit = max(1, min(BATCH, want, 2 * limit))
            if self.dead():
                self.inp.discard()  # type: ignore[union-attr]
                break
        self.finish()

    def handle(self, batch: list[Any]) -> None:
        """Process one batch and pass the outputs on (called by a fused upstream too)."""
        t0 = time.perf_counter()
        self.batch = batch
        try:
            out = self.process(batch)
        except _ItemFailure as f:
            raise _Failed(StageError(self.name, f.item, f.exc)) from None
        self.busy += time.perf_counter() - t0
        self.items_in += len(batch)
        if out:
            self.items_out += len(out)
            self.emit(out)
        nxt = self.fused_next
        if nxt is not None and nxt.items_in >= SPLIT_AFTER and self.items_in >= SPLIT_AFTER \
                and self.busy > SPLIT_COST * self.items_in and nxt.busy > SPLIT_COST * nxt.items_in:
            self._split()

    def handle_chunk(self, items: list[Any], ticket: Ticket | None) -> None:
        """:meth:`handle` for the items of one source chunk that all share ``ticket``
        (in a tracked run, see :meth:`SourceContext.emit`): they travel as a plain
        list, with no (item, ticket) pair per item, as long as the stages fused after
        take chunks too (maps, a writer); the first that does not gets the pairs.

        Counting stays exact: a map passes one output on per input, and an item an
        error policy skips is counted down from the ticket here.
        """
        t0 = time.perf_counter()
        self.batch = items
        try:
            out = self.process_chunk(items, ticket)
        except _ItemFailure as f:
            raise _Failed(StageError(self.name, f.item, f.exc)) from None
        self.busy += time.perf_counter() - t0
        self.items_in += len(items)
        nxt = self.fused_next
        if out:
            self.items_out += len(out)
            if nxt is not None and nxt.takes_chunks:
                nxt.handle_chunk(out, ticket)
            else:
                self.emit(list(zip(out, repeat(ticket))))
        if nxt is not None and nxt.items_in >= SPLIT_AFTER and self.items_in >= SPLIT_AFTER \
                and self.busy > SPLIT_COST * self.items_in and nxt.busy > SPLIT_COST * nxt.items_in:
            self._split()

    def _fast_map_chunk(self, items: list[Any], ticket: Ticket | None) -> list[Any]:
        return self._fast_map(items)   # a failure fails the run: the ticket stays

    def _careful_map_chunk(self, items: list[Any], ticket: Ticket | None) -> list[Any]:
        """A map with retries or an error policy over a chunk: the items it skips are
        handled, so the ticket counts them down."""
        n = len(items)
        out = self._process_careful(items)
        skipped = n - len(out)
        if skipped and ticket is not None and not self.run._aborted:
            release_all([ticket] * skipped)
        return out

    def _split(self) -> None:
        """Give the fused downstream stage a thread of its own, fed by its queue."""
        nxt = self.fused_next
        assert nxt is not None
        self.fused_next = None
        nxt.fused_prev = None
        self.setup_emit()
        nxt.spawn(nxt._body)
        with self.run._lock:
            self.run._alive += 1
        nxt.threads[-1].start()
        log.debug("unfused %r -> %r: both are slow per item", self.name, nxt.name)

    def dead(self) -> bool:
        nxt = self.fused_next
        return nxt.dead() if nxt is not None else self.outs_dead()

    def finish(self) -> None:
        self.close_outs()
        nxt = self.fused_next
        if nxt is not None:
            nxt.finish()

    # fast paths: C-level loops; on failure, find the item from the iterator's position

    def _fast_map(self, batch: list[Any]) -> list[Any]:
        it = iter(batch)
        try:
            return list(map(self.call, it))
        except Exception as exc:
            raise _ItemFailure(batch[len(batch) - _remaining(it) - 1], exc) from None

    def _fast_filter(self, batch: list[Any]) -> list[Any]:
        it = iter(batch)
        try:
            return list(filter(self.call, it))
        except Exception as exc:
            raise _ItemFailure(batch[len(batch) - _remaining(it) - 1], exc) from None

    def _fast_sink(self, batch: list[Any]) -> list[Any]:
        it = iter(batch)
        try:
            deque(map(self.call, it), maxlen=0)
        except Exception as exc:
            raise _ItemFailure(batch[len(batch) - _remaining(it) - 1], exc) from None
        return []

    def _fast_map_tracked(self, batch: list[Any]) -> list[Any]:
        """A map over (item, ticket) pairs: the outputs keep their inputs' tickets."""
        xs = list(map(_first, batch))
        self.batch = xs  # what an abort empties, to stop the loop
        it = iter(xs)
        try:
            ys = list(map(self.call, it))
        except Exception as exc:  # a failed run reports none of these items done
            raise _ItemFailure(xs[len(xs) - _remaining(it) - 1], exc) from None
        # after an abort ys may be short: those outputs are abandoned, never reported
        return list(zip(ys, map(_second, batch), strict=False))

    def _fast_flatmap(self, batch: list[Any]) -> list[Any]:
        it = iter(batch)
        outputs = chain.from_iterable(map(self.call, it))
        perf = time.perf_counter
        while True:
            try:
                chunk = list(islice(outputs, BATCH))
            except Exception as exc:
                raise _ItemFailure(batch[len(batch) - _remaining(it) - 1], exc) from None
            if not chunk:
                return []
            self.items_out += len(chunk)
            t0 = perf()
            self.emit(chunk)
            self.busy -= perf() - t0  # time blocked downstream is not busy time

    # careful path: per item, with retries and the error policy

    def _call_one(self, x: Any) -> Any:
        flavor, call = self.stage.flavor, self.call
        retries = self.stage.option("retries")
        attempt = 0
        while True:
            try:
                if flavor == "map":
                    return call(x)
                if flavor == "flatmap":
                    return list(call(x))
                if flavor == "filter":
                    return bool(call(x))
                call(x)
                return None
            except Exception:
                if attempt >= retries:
                    raise
                self.run._sleep(self.stage.option("backoff") * (2 ** attempt))
                attempt += 1

    def _process_careful(self, batch: list[Any]) -> list[Any]:
        out: list[Any] = []
        flavor = self.stage.flavor
        for x in batch:
            try:
                r = self._call_one(x)
            except Exception as exc:
                self.handle_error(x, exc)
                continue
            if flavor == "map":
                out.append(r)
            elif flavor == "flatmap":
                out.extend(r)
            elif flavor == "filter" and r:
                out.append(x)
        return out

    def _process_tracked(self, batch: list[Any]) -> list[Any]:
        out: list[Any] = []
        done: list[Ticket | None] = []
        flavor = self.stage.flavor
        try:
            for x, t in batch:
                try:
                    r = self._call_one(x)
                except Exception as exc:
                    self.handle_error(x, exc)  # raises under on_error="raise"
                    done.append(t)  # an item an error policy skips is handled
                    continue
                if flavor == "map":
                    out.append((r, t))
                elif flavor == "flatmap":
                    if not r:
                        done.append(t)
                    else:
                        if len(r) > 1:
                            retain([t], len(r) - 1)
                        out.extend((y, t) for y in r)
                elif flavor == "filter":
                    if r:
                        out.append((x, t))
                    else:
                        done.append(t)
                else:
                    done.append(t)
        finally:
            release(done)
        return out


# -- writer sinks -----------------------------------------------------------------

class _WriterRunner(_SingleRunner):
    """A sink whose stage has ``internal={"writer": open_writer}`` (``kafka_sink``).

    ``open_writer(done, ctx=..., **kwargs)`` returns a writer with
    ``write(items, tokens)``, ``tick()`` and ``close(ok)``. ``tokens`` are the
    items' completion tickets (``None`` when the run tracks nothing); the writer
    calls ``done(tokens)`` once those items are handled (e.g. acknowledged by a
    broker), in any thread. ``tick()`` runs whenever no input came for
    ``internal["tick"]`` seconds; ``close(True)`` at the end of the stream
    (everything written must be done by then; it releases its resources even when
    it raises), ``close(False)`` after a failure or an abort (what was not done is
    abandoned).

    The writer runs where a single-worker sink would: fused into the upstream
    stage's thread (called with each output batch; no queue, no thread hop), or in
    a thread of its own after a source, a pool or a fan-out. Its errors are
    StageErrors naming the sink, wherever it runs.
    """

    kind = "writer"
    writer: Any = None
    closed = False

    takes_chunks = True

    def start(self) -> None:
        self.setup_emit()
        self.process = self._write
        self.process_chunk = self._write_chunk
        self.tick_every = float(self.stage.internal.get("tick") or 0.1)
        if self.fused_prev is None:
            self.spawn(self._body)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        with _StageErrors(self.name):
            fn(*args)

    def open(self) -> None:
        """Open the writer in the thread that will run it (a connection may take a while)."""
        if self.writer is not None:
            return
        st = self.stage
        done = release_all if self.tracked else _discard
        with _StageErrors(self.name):
            self.writer = st.internal["writer"](done, ctx=SourceContext(self), **st.kwargs)
        self.run._on_end.append(self._abandon)

    def _write(self, batch: list[Any]) -> list[Any]:
        if self.writer is None:
            self.open()   # fused behind an in-memory source: opened on first use
        if self.tracked:
            items = list(map(_first, batch))
            self.batch = items  # what an abort empties, to stop the writer's loop
            self._guard(self.writer.write, items, list(map(_second, batch)))
        else:
            self._guard(self.writer.write, batch, None)
        return []

    def _write_chunk(self, items: list[Any], ticket: Ticket | None) -> list[Any]:
        if self.writer is None:
            self.open()
        self._guard(self.writer.write, items, [ticket] * len(items) if self.tracked else None)
        return []

    def tick(self) -> None:
        if self.writer is not None and not self.closed:
            self._guard(self.writer.tick)

    def finish(self) -> None:
        if self.run._aborted:
            return   # abandoned: the run-end callback closes the writer as failed
        if self.writer is None:
            self.open()   # no items came: still connect, so a bad address fails the run
        if not self.closed:
            self.closed = True
            self._guard(self.writer.close, True)
        self.close_outs()

    def _abandon(self) -> None:
        """Run-end callback: a writer not closed at the end of its stream (failure,
        abort) is closed as failed."""
        if not self.closed:
            self.closed = True
            try:
                self.writer.close(False)
            except Exception:
                log.exception("closing sink %r after the run failed", self.name)


# -- per-item stages on a pool ----------------------------------------------------

_END = object()


class _PoolRunner(_Runner):
    """Per-item stages with several workers, processes, async functions or an engine.

    A feeder thread takes chunks from the input queue and submits them; an emitter
    thread passes the results on, in input order when ``ordered``. A bounded
    number of chunks is in flight (``workers`` for async, ``2 * workers``
    otherwise: a slot frees as a chunk completes, so the pool never idles behind
    a slow head-of-line chunk), and at most twice that many are held for
    reordering.
    """

    kind = "pool"

    def start(self) -> None:
        self.setup_emit()
        st = self.stage
        workers = st.option("workers")
        spec = TaskSpec(self.call, st.flavor, st.option("retries"), st.option("backoff"),
                        stop_on_error=st.option("on_error") == "raise")
        engine = self.run.engine
        if st.is_async:
            self.pool: Any = AsyncPool(spec, workers, self.name)
            window, self.target = workers, 0.0
        elif engine is not None and engine.accepts(st):
            self.pool = engine.pool(spec, st, workers)
            window, self.target = engine.window(workers), engine.target_task_seconds
        elif st.option("executor") == "process":
            self.pool = ProcessPool(spec, workers, self.name)
            window, self.target = 2 * workers, 0.02
        else:
            self.pool = ThreadPool(spec, workers, self.name, sleep=self.run._sleep)
            window, self.target = 2 * workers, 0.001
        self.ordered = st.option("ordered")
        self.slots = _Slots(window, self.run)       # chunks running or queued in the pool
        self.reorder = _Slots(2 * window, self.run)  # chunks not yet passed on (reorder window)
        self.results = Channel(1 << 30, name=f"{self.name}:results")
        self.run._wakeables.append(self.results)
        self.chunk = 1
        self.pending: dict[int, tuple[list[Any], list[Ticket | None] | None]] = {}
        self.spawn(self._feed, ":feed")
        self.spawn(self._drain, ":emit")

    def _feed(self) -> None:
        get = self.inp.get  # type: ignore[union-attr]
        seq = 0
        try:
            while True:
                batch = get(self.chunk)
                if batch is None or self.outs_dead():
                    if batch and self.tracked:
                        _release_pairs(batch)  # dropped: nothing downstream wants it
                    break
                self.reorder.acquire()
                self.slots.acquire()
                if self.tracked:
                    xs = [x for x, _ in batch]
                    ts: list[Ticket | None] | None = [t for _, t in batch]
                else:
                    xs, ts = batch, None
                self.items_in += len(xs)
                self.pending[seq] = (xs, ts)
                try:
                    try:
                        fut = self.pool.submit(xs)
                    except Exception:
                        if not self._skips_unpicklable():
                            raise
                        # on_error applies to an item that cannot go to a worker process
                        # like to one that fails there: drop it, send the rest
                        xs, ts = self._drop_unpicklable(xs, ts)
                        self.pending[seq] = (xs, ts)
                        fut = self.pool.submit(xs) if xs else _settled_future(([], [], 0.0))
                except Exception as exc:
                    process = self.stage.option("executor") == "process"
                    raise _Failed(StageError(
                        self.name, _first_unpicklable(xs) if process else xs[0], exc, detail=(
                            "the item could not be sent to a worker process; items for "
                            "executor='process' must be picklable"
                            if process else None))) from None
                fut.add_done_callback(self._done_callback(seq))
                seq += 1
        finally:
            self.results.put((seq, _END))

    def _skips_unpicklable(self) -> bool:
        return (self.stage.option("executor") == "process"
                and self.stage.option("on_error") != "raise")

    def _drop_unpicklable(self, xs: list[Any], ts: list[Ticket | None] | None
                          ) -> tuple[list[Any], list[Ticket | None] | None]:
        """The items of a chunk that pickle (with their tickets); each one that does
        not goes to ``on_error`` and counts as handled."""
        import cloudpickle
        keep: list[Any] = []
        keep_ts: list[Ticket | None] = []
        for i, x in enumerate(xs):
            try:
                cloudpickle.dumps(x)
            except Exception as exc:
                self.handle_error(x, exc)   # raises if the on_error callback does
                if ts is not None:
                    release([ts[i]])
                continue
            keep.append(x)
            if ts is not None:
                keep_ts.append(ts[i])
        return keep, (keep_ts if ts is not None else None)

    def _done_callback(self, seq: int) -> Callable[[Any], None]:
        results = self.results

        def done(fut: Any) -> None:
            self.slots.release()
            try:
                results.put((seq, fut))
            except Aborted:
                pass
        return done

    def _drain(self) -> None:
        get = self.results.get
        total = -1
        handled = 0
        waiting: dict[int, Any] = {}
        next_seq = 0
        fail_fast = self.stage.option("on_error") == "raise"
        failed = True
        try:
            while total < 0 or handled < total:
                got = get()
                if got is None:
                    break
                for seq, fut in got:
                    if fut is _END:
                        total = seq
                    elif self.ordered:
                        fut = _Settled(fut)
                        if fut.error is not None or (fail_fast and fut.value[1]):
                            self._finish_chunk(seq, fut)  # raises: an error does not wait
                        waiting[seq] = fut                # for slower chunks before it
                    else:
                        self._finish_chunk(seq, fut)
                        handled += 1
                if self.ordered:
                    while next_seq in waiting:
                        self._finish_chunk(next_seq, waiting.pop(next_seq))
                        next_seq += 1
                        handled += 1
            if self.outs_dead():
                self.inp.discard()  # type: ignore[union-attr]
            failed = False
        except _Failed as f:
            # recorded before the pool shuts down: the errors that shutdown causes
            # elsewhere (e.g. the feeder submitting to a closed pool) must not win
            self.run._fail(f.error)
            raise
        finally:
            self.pool.shutdown(abort=failed or self.run._aborted)
            join = getattr(self.pool, "join", None)
            if join is not None:
                # a worker stuck in a call keeps this thread, and so the run, alive:
                # then the grace-period warning names this stage
                join()
        self.finish()

    def _finish_chunk(self, seq: int, fut: Any) -> None:
        xs, ts = self.pending.pop(seq)
        self.reorder.release()
        try:
            results, failures, secs = fut.result()
        except Exception as exc:
            if len(xs) == 1:
                raise _Failed(StageError(self.name, xs[0], exc)) from None
            # the whole task failed (e.g. its worker process died): which item did it
            # is not known, so none is blamed
            raise _Failed(StageError(self.name, exc=exc, detail=(
                f"in a chunk of {len(xs)} items, {repr_short(xs[0])} to "
                f"{repr_short(xs[-1])}"))) from None
        self.busy += secs
        if secs > 0 and results:
            per_item = secs / len(results)
            want = int(self.target / per_item) if per_item > 0 else BATCH
            self.chunk = max(1, min(BATCH, want, (self.chunk * 2) or 1))
        failed = dict(failures)
        for i, item_exc in failures:
            if i < len(xs):
                # raises under on_error="raise": the chunk's items are then never
                # reported done (the run failed before handling them)
                self.handle_error(xs[i], item_exc)
        flavor = self.stage.flavor
        out: list[Any] = []
        if ts is None:
            if flavor == "map":
                out = [r for i, r in enumerate(results) if i not in failed] if failed else results
            elif flavor == "flatmap":
                out = list(chain.from_iterable(r for i, r in enumerate(results) if i not in failed))
            elif flavor == "filter":
                out = [x for x, r, i in zip(xs, results, range(len(results)), strict=False)
                       if r and i not in failed]
        else:
            done: list[Ticket | None] = []
            for i, (x, t) in enumerate(zip(xs, ts, strict=False)):
                r = results[i] if i < len(results) else None
                if i in failed or flavor == "sink" or i >= len(results):
                    done.append(t)
                elif flavor == "map":
                    out.append((r, t))
                elif flavor == "flatmap":
                    if not r:
                        done.append(t)
                    else:
                        if len(r) > 1:
                            retain([t], len(r) - 1)
                        out.extend((y, t) for y in r)
                elif r:
                    out.append((x, t))
                else:
                    done.append(t)
            release(done)
        if out:
            self.items_out += len(out)
            self.emit(out)

    def on_abort(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            try:
                pool.shutdown(abort=True)
            except Exception:
                log.exception("shutting down the pool of %r failed", self.name)


class _ThreadWorkersRunner(_PoolRunner):
    """``workers > 1`` threads for a plain function: each worker takes a chunk from
    the input queue itself, runs it, and passes results on in order (the worker
    that completes the oldest outstanding chunk emits every chunk ready behind it).
    No feeder, no emitter, no futures: the fewest hand-offs per item, which is what
    an I/O-bound stage with many workers needs."""

    kind = "threads"

    def start(self) -> None:
        self.setup_emit()
        st = self.stage
        n = st.option("workers")
        self.spec = TaskSpec(self.call, st.flavor, st.option("retries"), st.option("backoff"),
                             stop_on_error=st.option("on_error") == "raise")
        self.ordered = st.option("ordered")
        self.fail_fast = st.option("on_error") == "raise"
        self.target = 0.001
        self.chunk = 1
        self.pending = {}
        self.ready: dict[int, _Settled] = {}
        self.take_lock = threading.Lock()
        self.emit_lock = threading.Lock()
        self.next_take = 0
        self.next_emit = 0
        self.live = n
        self.reorder = _Slots(4 * n, self.run)  # chunks taken but not yet passed on
        for i in range(n):
            self.spawn(self._work, f":{i}")

    def _work(self) -> None:
        ok = False
        try:
            while True:
                self.reorder.acquire()
                with self.take_lock:
                    batch = self.inp.get(self.chunk)  # type: ignore[union-attr]
                    if batch is None or self.outs_dead():
                        if batch and self.tracked:
                            _release_pairs(batch)  # dropped: nothing downstream wants it
                        self.reorder.release()
                        break
                    seq = self.next_take
                    self.next_take += 1
                    if self.tracked:
                        xs = [x for x, _ in batch]
                        ts: list[Ticket | None] | None = [t for _, t in batch]
                    else:
                        xs, ts = batch, None
                    self.items_in += len(xs)
                    self.pending[seq] = (xs, ts)
                settled = _Settled.of(run_chunk(self.spec, xs, self.run._sleep))
                with self.emit_lock:
                    if not self.ordered:
                        self._finish_chunk(seq, settled)
                        continue
                    if self.fail_fast and settled.value[1]:
                        self._finish_chunk(seq, settled)  # raises: an error does not wait
                    self.ready[seq] = settled
                    while self.next_emit in self.ready:
                        self._finish_chunk(self.next_emit, self.ready.pop(self.next_emit))
                        self.next_emit += 1
            ok = True
        finally:
            with self.emit_lock:
                self.live -= 1
                last = self.live == 0
        if ok and last:
            if self.outs_dead():
                self.inp.discard()  # type: ignore[union-attr]
            self.finish()


class _Settled:
    """A finished future's outcome, fetched once (an ordered stage may hold it a while)."""

    __slots__ = ("error", "value")

    def __init__(self, fut: Any) -> None:
        self.error: BaseException | None = None
        self.value: Any = None
        try:
            self.value = fut.result()
        except Exception as exc:
            self.error = exc

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    @classmethod
    def of(cls, value: Any) -> _Settled:
        settled = cls.__new__(cls)
        settled.error, settled.value = None, value
        return settled


# -- stream=True stages -----------------------------------------------------------

TICK: Any = type("Tick", (), {"__repr__": lambda self: "TICK"})()
_TICKED = (TICK,)  # an idle tick, as one more batch of the input chain


class _StreamRunner(_Runner):
    """A stage whose function takes the whole input iterator."""

    kind = "stream"
    rest: Iterator[Any] = iter(())
    gone = False  # seen by the last flush: nothing downstream takes outputs any more
    fused_source: _SourceRunner | None = None  # in-memory data read in this thread

    def start(self) -> None:
        self.setup_emit()
        self.exhausted = False
        self.spawn(self._body)

    def _items(self) -> Iterator[Any]:
        """The input as one iterator (``TICK`` markers when the stage asked for them).

        A C-level chain over the batches the channel hands over: taking an item
        costs no Python frame (a generator yielding per item cost ~0.1 us an item).
        """
        return chain.from_iterable(self._batches())

    def _batches(self) -> Iterator[Iterable[Any]]:
        if self.fused_source is not None:
            yield from self._memory_batches(self.fused_source)
            return
        get = self.inp.get  # type: ignore[union-attr]
        tick = self.stage.internal.get("tick")
        while True:
            if self.outbuf:
                self.flush()  # before waiting for input, pass on what is ready
            batch = get(BATCH, tick)
            if batch is None:
                self.exhausted = True
                return
            if not batch:
                if tick is not None:
                    yield _TICKED
                continue
            self.items_in += len(batch)
            self.batch = batch
            # the chain pulls from this very iterator: it is what the function has
            # not taken yet when it returns early
            self.rest = it = iter(batch)
            yield it

    def _lists(self, tickets: deque[Ticket | None] | None) -> Iterator[Any]:
        """The input as lists of items (``internal={"lists": True}``), ``TICK`` markers
        between them when the stage asked for ticks. Tracked, the items' tickets are
        kept in ``tickets`` (in input order) and the lists hold the bare items."""
        if self.fused_source is not None:
            yield from self._memory_batches(self.fused_source, hold=False)
            return
        get = self.inp.get  # type: ignore[union-attr]
        tick = self.stage.internal.get("tick")
        while True:
            if self.outbuf:
                self.flush()
            batch = get(BATCH, tick)
            if batch is None:
                self.exhausted = True
                return
            if not batch:
                if tick is not None:
                    yield TICK
                continue
            self.items_in += len(batch)
            if tickets is not None:
                tickets.extend(map(_second, batch))
                batch = list(map(_first, batch))
            yield batch

    def _memory_batches(self, src: _SourceRunner, hold: bool = True) -> Iterator[list[Any]]:
        """Read an in-memory source directly (it can never block, so no thread, no
        queue), stopping when the source is asked to stop. Slices start small and
        grow while the stage takes less than BATCH_SECONDS a slice, so that a slow
        stage passes its first outputs on early."""
        data = src.stage.args[0]
        # a list, tuple or range is sliced (a copy of pointers), anything else iterated
        seq = data if type(data) in (list, tuple, range) else None
        it = iter(data)
        pos = 0
        perf = time.perf_counter
        limit = 16
        flushed = perf()
        while not (src.stop_requested or self.run._aborted):
            # outputs go on before each slice while slices are small (the stage is
            # slow, or just started), else every BATCH_SECONDS: reading never blocks
            if self.outbuf and (limit < MEMORY_SLICE or perf() - flushed >= BATCH_SECONDS):
                self.flush()
                flushed = perf()
            if seq is None:
                batch = list(islice(it, limit))
            else:
                part = seq[pos:pos + limit]
                pos += len(part)
                batch = part if type(part) is list else list(part)
            if not batch:
                break
            src.items_out += len(batch)
            self.items_in += len(batch)
            if hold:
                self.batch = batch  # emptied by an abort: the item loop stops
            t0 = perf()
            yield batch
            per_item = (perf() - t0) / len(batch)
            want = int(BATCH_SECONDS / per_item) if per_item > 0 else MEMORY_SLICE
            limit = max(1, min(MEMORY_SLICE, want, 2 * limit))
        self.exhausted = True

    def flush(self) -> None:
        """Pass on the buffered outputs (internal operators buffer theirs)."""
        buf = self.outbuf
        if buf:
            self.outbuf = []
            self.items_out += len(buf)
            self.emit(buf)
            self.gone = self.outs_dead()

    def _body(self) -> None:
        st = self.stage
        # internal operators that take whole lists: a sink always (it reports what is
        # done with done(n)), a transform when untracked (tracked, it takes items and
        # names the inputs behind each output as below)
        lists = st.internal.get("lists", False) and (st.kind == SINK or not self.tracked)
        with_done = st.internal.get("with_done", False)
        explicit = st.internal.get("explicit_tracking", False) and not lists
        held: list[Ticket | None] = []   # tickets released when the stage ends
        pending: list[Ticket | None] = []
        current: list[Ticket | None] = [None]
        # explicit tracking: inputs not yet released, by ticket, with how many items hold
        # it (one ticket may travel with several items, e.g. a flat-map's outputs)
        outstanding: dict[int, list[Any]] = {}
        self.outbuf = []
        self.buffered = bool(st.internal.get("context"))
        extra: dict[str, Any] = {}
        if st.internal.get("context"):
            extra["ctx"] = SourceContext(self)

        if lists:
            tickets: deque[Ticket | None] | None = deque() if self.tracked else None
            extra["lists"] = True
            if st.kind == SINK:
                extra["done"] = _done_oldest(tickets)

            def inputs() -> Iterator[Any]:
                return self._lists(tickets)
        elif explicit:
            def release_tokens(tokens: Iterable[Any]) -> None:
                gone = []
                for t in tokens:
                    entry = outstanding.get(id(t)) if t is not None else None
                    if entry is not None:
                        gone.append(entry[0])
                        entry[1] -= 1
                        if not entry[1]:
                            del outstanding[id(t)]
                release(gone)
            extra["release"] = release_tokens
            if self.tracked:
                def inputs() -> Iterator[Any]:
                    for pair in self._items():
                        if pair is not TICK and pair[1] is not None:
                            entry = outstanding.get(id(pair[1]))
                            if entry is None:
                                outstanding[id(pair[1])] = [pair[1], 1]
                            else:
                                entry[1] += 1
                        yield pair
            elif st.internal.get("tick") is None:
                def inputs() -> Iterator[Any]:
                    return zip(self._items(), repeat(None))  # C speed: no TICKs to spare
            else:
                def inputs() -> Iterator[Any]:
                    for x in self._items():
                        yield x if x is TICK else (x, None)
        elif self.tracked and with_done:
            def inputs() -> Iterator[Any]:
                for pair in self._items():
                    if pair is TICK:
                        yield pair
                        continue
                    x, t = pair
                    yield x, (_noop if t is None else _releaser(t))
        elif self.tracked and st.kind == SINK:
            def inputs() -> Iterator[Any]:
                for pair in self._items():
                    if pair is TICK:
                        yield pair
                        continue
                    held.append(pair[1])
                    yield pair[0]
        elif self.tracked:
            def inputs() -> Iterator[Any]:
                for pair in self._items():
                    if pair is TICK:
                        yield pair
                        continue
                    pending.append(pair[1])
                    yield pair[0]
        elif with_done and st.internal.get("tick") is None:
            def inputs() -> Iterator[Any]:
                return zip(self._items(), repeat(_noop))  # C speed: no TICKs to spare
        elif with_done:
            def inputs() -> Iterator[Any]:
                for x in self._items():
                    yield x if x is TICK else (x, _noop)
        else:
            inputs = self._items

        source = inputs()
        try:
            with _StageErrors(self.name):
                result = self.call(source, **extra)
            if st.kind == SINK:
                if result is not None and hasattr(result, "__next__"):
                    self._consume(result)
            else:
                self._forward(result, pending, current, outstanding if explicit else None)
                self.flush()
            if not self.exhausted and self.fused_source is not None:
                self.fused_source.stop_requested = True  # the data is simply not read
            elif not self.exhausted:
                # the function returned before its input ended: it wants no more
                self.inp.discard()  # type: ignore[union-attr]
                dropped = list(self.rest)  # the rest of the batch it was given
                for x in self._items():
                    if x is not TICK:
                        dropped.append(x)
                if self.tracked:  # what a stage wants no more of is handled
                    _release_pairs(dropped)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        if self.tracked:  # only when the stage ended well: a failed run reports nothing
            release(pending)
            release(held)
            release([current[0]])
            release([t for t, n in outstanding.values() for _ in range(n)])
        self.finish()

    def _consume(self, result: Iterator[Any]) -> None:
        with _StageErrors(self.name):
            for _ in result:
                pass

    def _forward(self, result: Any, pending: list[Ticket | None],
                 current: list[Ticket | None], outstanding: dict[int, list[Any]] | None) -> None:
        try:
            it = iter(result)
        except TypeError:
            raise _Failed(StageError(self.name, exc=TypeError(
                f"a stream=True transform must return or yield an iterable, got "
                f"{type(result).__name__}"))) from None
        emit = self.emit
        buffered = self.buffered
        tracked = self.tracked
        if buffered and outstanding is None and not tracked:
            self._forward_plain(it)
            return
        nxt = it.__next__
        while True:
            try:
                y = nxt()
            except StopIteration:
                return
            except (_Failed, Aborted):
                raise
            except StageError as err:
                raise _Failed(err) from None
            except Exception as exc:
                raise _Failed(StageError(self.name, exc=exc)) from None
            if outstanding is not None:  # explicit tracking: the stage names the inputs
                y, tokens = y
                if tracked:
                    ts = [t for t in tokens if t is not None and id(t) in outstanding]
                    retain(ts, 1)
                    y = (y, group(ts))
            elif tracked:
                if pending:
                    g = group(pending)
                    pending.clear()
                    retain([g], 1)          # one for the output, one kept
                    release([current[0]])
                    current[0] = g
                else:
                    retain([current[0]], 1)
                y = (y, current[0])
            if buffered:
                buf = self.outbuf
                buf.append(y)
                if len(buf) >= BATCH:
                    self.flush()
            else:
                self.items_out += 1
                emit([y])
            if self.outs_dead():
                return

    def _forward_plain(self, it: Iterator[Any]) -> None:
        """Untracked outputs of an internal operator: appended to the output buffer,
        passed on BATCH at a time (and whenever the stage waits for input); whether
        anyone downstream still takes them is checked as a batch goes."""
        with _StageErrors(self.name):
            for y in it:
                buf = self.outbuf  # anew each time: taking input flushes it
                buf.append(y)
                if len(buf) >= BATCH:
                    self.flush()
                if self.gone:
                    return


def _in_memory(stage: Stage) -> bool:
    """A from_iterable source over data held in memory (reading it cannot block)."""
    from ._stage import _iterate
    if stage.fn is not _iterate or stage.option("track") or not stage.args:
        return False
    data = stage.args[0]
    return isinstance(data, _MEMORY_TYPES)


def _settled_future(result: Any) -> Any:
    """A future that already holds ``result`` (a chunk with nothing left to run)."""
    from concurrent.futures import Future
    fut: Future[Any] = Future()
    fut.set_result(result)
    return fut


def _first_unpicklable(xs: list[Any]) -> Any:
    """The item of a chunk that cannot be pickled (the chunk's first if none alone)."""
    import cloudpickle
    for x in xs:
        try:
            cloudpickle.dumps(x)
        except Exception:
            return x
    return xs[0]


def _done_oldest(tickets: deque[Ticket | None] | None) -> Callable[[int], None]:
    """The ``done(n)`` of a sink that takes lists: the oldest ``n`` items it was given
    and has not reported yet are handled (one release for all of them)."""
    if tickets is None:
        return _done_untracked

    def done(n: int) -> None:
        if n > len(tickets):
            raise ValueError(f"done({n}) reports more items than the stage holds "
                             f"({len(tickets)})")
        popleft = tickets.popleft
        release([popleft() for _ in range(n)])
    return done


def _done_untracked(n: int) -> None:
    return None


def _releaser(t: Ticket) -> Callable[[], None]:
    def done() -> None:
        release([t])
    return done


# -- the run ----------------------------------------------------------------------

class Run:
    """A running (or finished) pipeline.

    Returned by :meth:`Pipeline.start`. ``join()`` waits, ``stop()`` stops,
    ``stats()`` reports live counts; as a context manager, leaving the block stops
    the run and joins it.

    >>> from nanostream import from_iterable, sink
    >>> seen = []
    >>> with (from_iterable(range(3)) | sink(seen.append)).start() as run:
    ...     finished = run.join(timeout=10)
    >>> finished, seen, run.running
    (True, [0, 1, 2], False)
    """

    fuse = True  # class-wide switch, so tests can run every shape unfused too

    def __init__(self, pipeline: Pipeline, engine: Any = None, progress: bool = False,
                 collect: bool = False) -> None:
        self.pipeline = pipeline
        self.engine = engine
        self._progress = progress
        self._collect = collect
        self._started = False
        self._started_at = 0.0
        self._ended_at: float | None = None
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._aborted = False
        self._aborted_at: float | None = None
        self._abort_event = threading.Event()
        self._done = threading.Event()
        self._alive = 0
        self._held = False   # the iterating loop counts as a thread (see start())
        self._loop_ident: int | None = None   # the thread the loop last took items in
        self._wakeables: list[Any] = []
        self._checked_in: set[threading.Thread] = set()
        self._abandoned: set[threading.Thread] = set()
        self._on_end: list[Callable[[], None]] = []  # SourceContext.on_run_end callbacks
        self._warned = False
        self.runners: list[_Runner] = []
        self.collector: Channel | None = None
        self._plan()

    # building ----------------------------------------------------------------

    def _plan(self) -> None:
        p = self.pipeline
        nodes = p.nodes
        if not p.sources():
            heads = ", ".join(repr(n.stage.name) for n in p.heads()) or "nothing"
            raise ValueError(f"this pipeline has no source, so there is nothing to run "
                             f"(it starts at {heads}); start it with a source, e.g. "
                             "ns.from_iterable(data) | ..., or use it as a segment")
        orphans = p.heads()
        if orphans:
            raise ValueError(f"stage {orphans[0].stage.name!r} has no input: connect a source "
                             "to it or remove it")
        for n in nodes:
            n.stage.check_complete()
        ends = p.open_ends()
        if self._collect and len(ends) != 1:
            names = ", ".join(repr(n.stage.name) for n in ends) or "none (it ends in sinks)"
            raise TypeError(f"only a pipeline with exactly one open end can be iterated; this "
                            f"one has {len(ends)}: {names}. Add sinks to the other branches, or "
                            "call .run()")
        order = _topological(p)
        pred, succ = p.predecessors(), p.successors()
        tracked: dict[Node, bool] = {}
        for n in order:
            tracked[n] = bool(n.stage.option("track")) if n.stage.kind == SOURCE else any(
                tracked[m] for m in pred[n])
        self._order = order
        channels: dict[Node, Channel] = {}
        for n in order:
            if n.stage.kind == SOURCE:
                continue
            channels[n] = Channel(n.stage.option("queue_size"), producers=len(pred[n]),
                                  name=n.stage.name,
                                  on_discard=_release_pairs if tracked[n] else None)
        if self._collect:
            end = ends[0]
            self.collector = Channel(BATCH * 2, name="<iterate>",
                                     on_discard=_release_pairs if tracked[end] else None)
            self._collect_tracked = tracked[end]
        runners: dict[Node, _Runner] = {}
        for n in order:
            st = n.stage
            inp = channels.get(n)
            if st.kind == SOURCE:
                r: _Runner = _SourceRunner(self, n, None)
            elif st.internal.get("writer") is not None:
                r = _WriterRunner(self, n, inp)
            elif st.flavor == "stream":
                r = _StreamRunner(self, n, inp)
            elif (st.option("executor") == "process" or st.is_async
                  or (self.engine is not None and self.engine.accepts(st))):
                r = _PoolRunner(self, n, inp)
            elif st.option("workers") > 1:
                r = _ThreadWorkersRunner(self, n, inp)
            else:
                r = _SingleRunner(self, n, inp)
            r.tracked = tracked[n]
            r.outs = [(channels[m], tracked[m] and not tracked[n]) for m in succ[n]]
            if self._collect and n is ends[0]:
                r.outs = [(self.collector, False)]  # type: ignore[list-item]
            runners[n] = r
        if self.fuse:
            for n in order:
                r = runners[n]
                preds = pred[n]
                if (isinstance(r, _SingleRunner) and len(preds) == 1
                        and isinstance(runners[preds[0]], _SingleRunner)
                        and len(succ[preds[0]]) == 1
                        and not (self._collect and preds[0] is ends[0])):
                    up = runners[preds[0]]
                    assert isinstance(up, _SingleRunner)
                    up.fused_next, r.fused_prev = r, up
                elif (isinstance(r, _SingleRunner) and len(preds) == 1
                        and isinstance(runners[preds[0]], _SourceRunner)
                        and len(succ[preds[0]]) == 1 and _in_memory(preds[0].stage)):
                    # in-memory data never blocks: read it in the first stage's thread
                    src = runners[preds[0]]
                    assert isinstance(src, _SourceRunner)
                    src.fused_next, r.fused_prev = r, src  # type: ignore[assignment]
                elif (isinstance(r, _SingleRunner) and len(preds) == 1
                        and isinstance(runners[preds[0]], _SourceRunner)
                        and len(succ[preds[0]]) == 1 and preds[0].stage.internal.get("chunks")
                        and not (self._collect and preds[0] is ends[0])):
                    # a chunk source: its chunks go straight into the next stage's code
                    src = runners[preds[0]]
                    assert isinstance(src, _SourceRunner)
                    src.fused_next, r.fused_prev = r, src  # type: ignore[assignment]
                elif (isinstance(r, _StreamRunner) and len(preds) == 1
                        and isinstance(runners[preds[0]], _SourceRunner)
                        and len(succ[preds[0]]) == 1 and _in_memory(preds[0].stage)):
                    src = runners[preds[0]]
                    assert isinstance(src, _SourceRunner)
                    src.read_by, r.fused_source = r, src
        self.runners = [runners[n] for n in order]
        self._wakeables.extend(channels.values())
        if self.collector is not None:
            self._wakeables.append(self.collector)

    # lifecycle -----------------------------------------------------------------

    def start(self) -> Run:
        """Start the threads. A run starts once; build a new one with ``pipeline.start()``."""
        with self._lock:
            if self._started:
                raise RuntimeError("this Run has already been started; call "
                                   "pipeline.start() to run the pipeline again")
            self._started = True
        self._started_at = time.monotonic()
        try:
            for r in self.runners:
                r.start()
        except BaseException:
            # a stage that cannot start (e.g. an unpicklable function for
            # executor='process'): shut down the pools the stages before it started
            for r in self.runners:
                r.on_abort()
            self._done.set()
            raise
        threads = [t for r in self.runners for t in r.threads]
        # iterating tracked items, the consumer's loop counts as one more thread: the run
        # (and its run-end callbacks, such as Kafka's final commit) ends only once the
        # loop has taken every item, so the last items' offsets are committed too
        self._held = bool(self._collect and self._collect_tracked)
        self._alive = len(threads) + self._held
        with _RUNS_LOCK:
            _RUNS.add(self)
        try:
            for t in threads:
                t.start()
        except BaseException:
            # Ctrl-C while starting: whether the thread being started was launched is
            # unknown, so every thread that has not checked in yet is given up (it
            # returns at once if it runs at all) and no longer counted
            with self._lock:
                gone = [t for t in threads if t not in self._checked_in]
                self._abandoned.update(gone)
            for _ in gone:
                self._thread_done()
            raise
        if self._progress:
            from ._display import start_progress
            self._progress_bar = start_progress(self)
        return self

    def _check_in(self) -> bool:
        """Called first by each stage thread: False if start() gave it up."""
        t = threading.current_thread()
        with self._lock:
            if t in self._abandoned:
                return False
            self._checked_in.add(t)
            return True

    def _release_hold(self) -> None:
        """The iterating loop is done with the run (it took every item, left, or the
        run is being stopped): it no longer counts as one of the run's threads."""
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._thread_done()

    def _thread_done(self) -> None:
        with self._lock:
            self._alive -= 1
            last = self._alive == 0
        if last:
            for callback in self._on_end:
                try:
                    callback()
                except Exception:
                    log.exception("run-end callback %r failed", callback)
            self._ended_at = time.monotonic()
            with _RUNS_LOCK:
                _RUNS.discard(self)
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            first = self._error is None and not self._aborted
            if first:
                self._error = error
        if first:
            log.debug("run failed: %s", error)
        self._abort()

    def _abort(self) -> None:
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
            self._aborted_at = time.monotonic()
        for r in self.runners:
            r.stop_requested = True
        self._release_hold()
        for w in list(self._wakeables):
            w.abort()
        for r in self.runners:
            r.on_abort()
        self._abort_event.set()  # last: whoever it wakes finds the run torn down

    def _sleep(self, seconds: float) -> None:
        """Sleep for a retry backoff, waking up (and giving up) if the run aborts."""
        if self._abort_event.wait(seconds):
            raise Aborted

    def _request_source_stop(self) -> None:
        for r in self.runners:
            if r.stage.kind == SOURCE:
                r.stop_requested = True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the run to end. True when it ended, False on timeout.

        Raises the run's :class:`StageError` if a stage failed.
        """
        if not self._started:
            raise RuntimeError("this Run was never started; call run.start() or pipeline.start()")
        _check_timeout("join", timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            wait = 0.2
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return False
            if self._done.wait(wait):
                break
            if self._aborted_at is not None and time.monotonic() - self._aborted_at > GRACE:
                self._warn_stuck()
                break
        if self._error is not None:
            raise self._error
        return True

    def _warn_stuck(self) -> None:
        if self._warned:
            return
        self._warned = True
        stuck = sorted({r.name for r in self.runners
                        if any(t.is_alive() for t in r.threads)})
        msg = (f"nanostream: stage(s) {', '.join(map(repr, stuck))} did not stop within "
               f"{GRACE:g} s (stuck inside a call that cannot be interrupted); their daemon "
               "threads are abandoned")
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        self._ended_at = time.monotonic()
        with _RUNS_LOCK:
            _RUNS.discard(self)

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the run and wait for it to end.

        ``drain=True`` stops each source at its next item and lets everything
        already inside finish (partial batches and windows are flushed);
        ``drain=False`` abandons what is in flight. Called from the thread of a
        loop iterating the pipeline (the loop is suspended in the call and can take
        nothing more), a drain would never end, so what is in flight is abandoned
        as with ``drain=False``. Errors are not raised here;
        ``join()`` raises them. With ``timeout``, a drain still going after that
        many seconds is abandoned too.
        """
        if not self._started:
            raise RuntimeError("this Run was never started")
        _check_timeout("stop", timeout)
        if self._done.is_set():
            return
        self._release_hold()   # what the loop has not taken yet is not handled
        if self.collector is not None and self._loop_ident == threading.get_ident():
            # called from the iterating loop's own thread: the loop, the pipeline's
            # only end, is suspended in this very call and takes nothing more, so
            # nothing inside can finish: a drain would wait for ever. Abandon what is
            # in flight instead (not handled: tracked sources see it as not done)
            drain = False
        if self._in_own_thread():
            # called by one of the run's own stages, which cannot wait for itself
            # to end: ask for the stop and let the run end as the stage returns
            if drain:
                self._request_source_stop()
            else:
                self._abort()
            return
        if drain:
            self._request_source_stop()
            deadline = None if timeout is None else time.monotonic() + timeout
            sources = [r for r in self.runners if r.stage.kind == SOURCE]
            t_stop = time.monotonic()
            while not self._done.wait(0.05):
                if deadline is not None and time.monotonic() > deadline:
                    break
                if time.monotonic() - t_stop > GRACE and any(
                        t.is_alive() for r in sources for t in r.threads):
                    break
        if not self._done.is_set():
            self._abort()
        while not self._done.wait(0.2):
            if time.monotonic() - (self._aborted_at or 0) > GRACE:
                self._warn_stuck()
                break

    def _in_own_thread(self) -> bool:
        me = threading.current_thread()
        for r in self.runners:
            pool = getattr(r, "pool", None)
            workers = pool.alive() if isinstance(pool, ThreadPool) else ()
            if me in r.threads or me in workers or me is getattr(pool, "_thread", None):
                return True
        return False

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.stop(drain=exc_type is None)
        if exc_type is None:
            self.join()

    @property
    def running(self) -> bool:
        """True between ``start()`` and the end of the run."""
        return self._started and not self._done.is_set() and not self._warned

    @property
    def error(self) -> BaseException | None:
        """The error that ended the run, if any."""
        return self._error

    def stats(self) -> Report:
        """A live :class:`Report` (counts so far and queue fill)."""
        end = self._ended_at if self._ended_at is not None else time.monotonic()
        elapsed = end - self._started_at if self._started else 0.0
        return Report([r.stats() for r in self.runners], elapsed, running=self.running)

    # whole-run helpers -----------------------------------------------------------

    def run_to_end(self, timeout: float | None) -> Report:
        _check_timeout("run", timeout)
        try:
            self.start()  # inside the try: a Ctrl-C may land while threads start
            if not self.join(timeout):
                self.stop(drain=False)
                if self._error is not None:
                    raise self._error  # a stage failed before the timeout: that error
                raise TimeoutError(f"the pipeline did not finish within {timeout} s and was "
                                   "stopped; pass a larger timeout, or use start() and "
                                   "stop() to run it for a while")
        except KeyboardInterrupt:
            if self._started:
                self.stop(drain=False)
            raise
        finally:
            bar = getattr(self, "_progress_bar", None)
            if bar is not None:
                bar.join(5)  # the bar's last update lands before run() returns
        return self.stats()

    def iterate(self) -> Iterator[Any]:
        ch = self.collector
        assert ch is not None
        tracked = self._collect_tracked
        try:
            self.start()  # inside the try: a Ctrl-C may land while threads start
            while True:
                self._loop_ident = threading.get_ident()
                try:
                    batch = ch.get(BATCH)
                except Aborted:
                    break
                if batch is None:
                    break
                if tracked:
                    for x, t in batch:
                        yield x
                        release([t])
                else:
                    yield from batch
            self._release_hold()
            self.join()
        finally:
            self._release_hold()
            if self._started and not self._done.is_set():
                self.stop(drain=False)

    def _repr_html_(self) -> str | None:
        try:
            from ._display import run_html
        except ImportError:
            return None
        return run_html(self)

    def __repr__(self) -> str:
        state = ("not started" if not self._started else "running" if self.running
                 else "failed" if self._error is not None else "stopped" if self._aborted
                 else "finished")
        return f"<Run {state} of Pipeline({_describe(self.pipeline)})>"


def _describe(p: Pipeline) -> str:
    from ._graph import describe
    return describe(p)


def _release_pairs(items: list[Any]) -> None:
    release([t for _, t in items])


def _topological(p: Pipeline) -> list[Node]:
    pred = p.predecessors()
    succ = p.successors()
    indeg = {n: len(v) for n, v in pred.items()}
    ready = [n for n in p.nodes if indeg[n] == 0]
    order: list[Node] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in succ[n]:
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    if len(order) != len(indeg):
        cyc = [n.stage.name for n in p.nodes if indeg[n] > 0]
        raise ValueError(f"the pipeline has a cycle through {', '.join(map(repr, cyc))}; "
                         "pipelines must be acyclic")
    return order

