"""Fault injection over random graphs: the generator, the faulty stages, the checks.

An :class:`Example` describes a random pipeline (sources, chains, fan-out, fan-in,
segments), the options of every stage (``workers``, ``ordered``, executor
``thread`` / ``async`` / ``process``, ``on_error``, ``queue_size``), the faults
injected into stages and sources (raise, slow, block, flaky) and what the test
does to the run (let it end, ``stop(drain=True/False)``, iterate it all, or break
out of the loop early). :func:`run_example` builds it, runs it, and checks the
invariants on every example:

* the run ends within :data:`BOUND` seconds of the test's last action (a blocked
  stage is released by the test once the stop or abort is under way, so a hang of
  the runtime itself fails the example, with every thread's stack);
* an error surfaces exactly once, from ``join`` / the loop, as a
  :class:`nanostream.StageError` naming a stage and item that really failed,
  chained to the injected exception; when a fault under ``on_error="raise"`` fired
  and the test did not abort the run, an error must surface; nothing else is
  warned or logged;
* no thread and no worker process of the run is left behind;
* when the run was not aborted (it ended, or ``stop(drain=True)``), every item the
  sources emitted is handled or reported: each sink and the loop got exactly what
  the same graph computes in plain Python over the emitted items, the skipping
  stages counted exactly the failing items as errors, and an ``on_error`` callback
  was called with exactly those; when it was aborted, nothing arrived that plain
  Python would not produce.

``tally`` counts examples, actions, executors and faults (planned and fired) by
kind; ``NANOSTREAM_FAULT_TALLY=path.json`` makes the test module write it.

The stage functions live here (not in the test module) so that worker processes
of ``executor="process"`` import them by reference; hypothesis is imported only by
the strategies, so a worker process does not pay for it.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import nanostream as ns
from nanostream import StageError, sink, source, transform
from nanostream._graph import Pipeline
from nanostream._pool import RemoteTraceback
from nanostream._runtime import Run

BOUND = 15.0          # seconds a run may take to end after the test's last action
RELEASE_AFTER = 5.0   # a blocked stage not released by then means the run missed a stop
FLAVORS = ("map", "flatmap", "filter")
FAULT_KINDS = ("raise", "slow", "block", "flaky")


class Boom(Exception):
    """The injected failure: ``Boom(stage, item)`` (``item`` None for a source)."""


# -- what a stage computes (plain Python; the simulation uses the same functions) ------

def _map0(x: int) -> int:
    return x + 1


def _map1(x: int) -> int:
    return 3 * x


def _map2(x: int) -> int:
    return x // 2 + 7


def _flat0(x: int) -> list[int]:
    return [x, x + 1]


def _flat1(x: int) -> list[int]:
    return [] if x % 3 == 0 else [x]


def _flat2(x: int) -> list[int]:
    return [x] * (x % 3)


def _keep0(x: int) -> bool:
    return x % 2 == 0


def _keep1(x: int) -> bool:
    return x % 3 != 1


FUNCTIONS = {"map": (_map0, _map1, _map2), "flatmap": (_flat0, _flat1, _flat2),
             "filter": (_keep0, _keep1), "sink": (None,)}


def apply(flavor: str, fn: int, x: int) -> list[int]:
    """What one item becomes: the outputs of ``flavor``'s function ``fn``."""
    f = FUNCTIONS[flavor][fn]
    if flavor == "map":
        return [f(x)]  # type: ignore[misc]
    if flavor == "flatmap":
        return list(f(x))  # type: ignore[misc]
    if flavor == "filter":
        return [x] if f(x) else []  # type: ignore[misc]
    return []


# -- the description ----------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    kind: str        # raise, slow, block (first hit only), flaky (fails once, retried)
    modulus: int     # items x with (x * 7919 + salt) % modulus == 0 are hit
    salt: int = 0
    delay: float = 0.001  # seconds, for slow
    hard: bool = False    # an async stage's block holds its whole event loop

    def hits(self, x: int) -> bool:
        return (x * 7919 + self.salt) % self.modulus == 0


@dataclass(frozen=True)
class StageSpec:
    flavor: str            # map, flatmap, filter, sink; batch: ns.batch(fn) | ns.flatten()
    fn: int = 0
    workers: int = 1
    ordered: bool = True
    executor: str = "thread"   # thread, async, process
    on_error: str = "raise"    # raise, skip, callback
    queue_size: int | None = None
    fault: Fault | None = None
    timeout: float | None = None   # batch(size, timeout=...): flushed by time too

    def failing(self, x: int) -> bool:
        """True when the item fails for good (after retries)."""
        return self.fault is not None and self.fault.kind == "raise" and self.fault.hits(x)


@dataclass(frozen=True)
class SourceSpec:
    n: int
    generator: bool = True          # False: an in-memory list (read in slices)
    fault: str | None = None        # raise, slow, block (generators only)
    at: int = 0                     # the item index where the fault strikes
    delay: float = 0.001

    def items(self, k: int) -> list[int]:
        return [k * 100_000 + i for i in range(self.n)]


@dataclass(frozen=True)
class Graph:
    sources: tuple[tuple[SourceSpec, tuple[StageSpec, ...]], ...]  # two = fan-in
    pre: tuple[StageSpec, ...] = ()
    segment: bool = False              # pre is built as a segment first
    branches: tuple[tuple[StageSpec, ...], ...] = ()  # fan-out
    merge: bool = False                # the branches join again (fan-in) into post
    post: tuple[StageSpec, ...] = ()
    open_end: bool = False             # the last chain ends open (iterated) not in a sink
    final_sink: StageSpec = field(default_factory=lambda: StageSpec("sink"))


@dataclass(frozen=True)
class Example:
    graph: Graph
    action: str = "end"     # end, stop, collect, break, timeout (run(timeout=...))
    drain: bool = True      # for stop
    trigger: int = 0        # stop / break after this many items (or a block); stop at 0:
                            # at once, while the stage threads are still starting
    hold: float = 0.0       # seconds a block holds when nothing stops the run
    fuse: bool = True       # Run.fuse: single-worker chains run fused in one thread
    timeout: float | None = None  # stop(drain=True, timeout=...) / run(timeout=...)
    second_stop: bool = False     # another thread calls stop(drain=not drain) at once too

    def stages(self) -> list[StageSpec]:
        g = self.graph
        out = [s for _, head in g.sources for s in head] + list(g.pre)
        for b in g.branches:
            out.extend(b)
        out.extend(g.post)
        if not g.open_end or (g.branches and not g.merge):
            out.append(g.final_sink)
        return out


# -- the recorder: what the stages saw and did ------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sinks: dict[str, list[int]] = {}
        self.raised: dict[str, list[Any]] = {}
        self.reported: dict[str, list[Any]] = {}
        self.emitted: dict[str, list[int]] = {}
        self.fired: Counter[str] = Counter()
        self.tried: set[tuple[str, int]] = set()
        self.blocked: set[str] = set()
        self.calls = 0
        self.trigger_at = 1 << 60
        self.block_reached = threading.Event()
        self.release = threading.Event()
        self.trigger = threading.Event()

    def count(self) -> None:
        with self.lock:
            self.calls += 1
            if self.calls >= self.trigger_at:
                self.trigger.set()

    def fire(self, kind: str) -> None:
        with self.lock:
            self.fired[kind] += 1

    def first_block(self, name: str) -> bool:
        with self.lock:
            if name in self.blocked:
                return False
            self.blocked.add(name)
            self.fired["block"] += 1
            return True

    def first_try(self, name: str, x: int) -> bool:
        with self.lock:
            if (name, x) in self.tried:
                return False
            self.tried.add((name, x))
            self.fired["flaky"] += 1
            return True

    def raise_(self, name: str, x: Any) -> None:
        with self.lock:
            self.raised.setdefault(name, []).append(x)
            self.fired["raise"] += 1
        raise Boom(name, x)

    def block(self) -> None:
        self.block_reached.set()
        self.trigger.set()
        self.release.wait(60)  # the test releases it; 60 s only so no thread lives forever

    def reporter(self, name: str) -> Any:
        def on_error(item: Any, exc: BaseException) -> None:
            assert isinstance(exc, Boom), exc
            with self.lock:
                self.reported.setdefault(name, []).append(item)
        return on_error


class ThreadFn:
    """A stage's function for the thread and async executors, with its fault."""

    def __init__(self, name: str, spec: StageSpec, rec: Recorder) -> None:
        self.name, self.spec, self.rec = name, spec, rec
        self.fn = FUNCTIONS[spec.flavor][spec.fn]

    def fault(self, x: int) -> None:
        f, rec = self.spec.fault, self.rec
        rec.count()
        if f is None or not f.hits(x):
            return
        if f.kind == "raise":
            rec.raise_(self.name, x)
        elif f.kind == "slow":
            rec.fire("slow")
            time.sleep(f.delay)
        elif f.kind == "flaky":
            if rec.first_try(self.name, x):
                raise Boom(self.name, x)
        elif f.kind == "block" and rec.first_block(self.name):
            rec.block()

    async def afault(self, x: int) -> None:
        f, rec = self.spec.fault, self.rec
        if f is not None and f.kind == "block" and f.hits(x) and not f.hard \
                and rec.first_block(self.name):
            rec.count()
            rec.block_reached.set()
            rec.trigger.set()
            # a cooperative wait (the loop stays alive) for a release from another thread
            while not rec.release.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            return
        if f is not None and f.kind == "slow" and f.hits(x):
            rec.count()
            rec.fire("slow")
            await asyncio.sleep(f.delay)
            return
        self.fault(x)

    def stage(self, options: dict[str, Any]) -> Any:
        flavor, fn, name, rec = self.spec.flavor, self.fn, self.name, self.rec
        if self.spec.executor == "async":
            if flavor == "sink":
                async def a_sink(x: int) -> None:
                    await self.afault(x)
                    with rec.lock:
                        rec.sinks.setdefault(name, []).append(x)
                return sink(a_sink, **options)

            async def a_call(x: int) -> Any:
                await self.afault(x)
                return fn(x)  # type: ignore[misc]
            if flavor == "map":
                return transform(a_call, **options)
            if flavor == "flatmap":
                return ns.flat_map(a_call, **options)
            return ns.filter(a_call, **options)
        if flavor == "sink":
            def t_sink(x: int) -> None:
                self.fault(x)
                with rec.lock:
                    rec.sinks.setdefault(name, []).append(x)
            return sink(t_sink, **options)
        if flavor == "flatmap":
            def t_gen(x: int) -> Any:  # fails after its first output: nothing may leak
                ys = fn(x)  # type: ignore[misc]
                if not ys:
                    self.fault(x)
                for i, y in enumerate(ys):
                    yield y
                    if i == 0:
                        self.fault(x)
            return transform(t_gen, **options)

        def t_call(x: int) -> Any:
            self.fault(x)
            return fn(x)  # type: ignore[misc]
        if flavor == "map":
            return transform(t_call, **options)
        return ns.filter(t_call, **options)


class ProcessFn:
    """A stage's function for ``executor="process"``: pickled by reference, no shared
    state (a flaky item's first try is remembered in the worker process)."""

    def __init__(self, name: str, spec: StageSpec) -> None:
        self.name, self.spec = name, spec
        self.tried: set[int] = set()

    def __call__(self, x: int) -> Any:
        f = self.spec.fault
        if f is not None and f.hits(x):
            if f.kind == "raise":
                raise Boom(self.name, x)
            if f.kind == "slow":
                time.sleep(f.delay)
            if f.kind == "flaky" and x not in self.tried:
                self.tried.add(x)
                raise Boom(self.name, x)
        out = FUNCTIONS[self.spec.flavor][self.spec.fn](x)  # type: ignore[misc]
        return list(out) if self.spec.flavor == "flatmap" else out


# -- building --------------------------------------------------------------------------

class Built:
    """The pipeline of an example, with its stages' specs and sources by name."""

    def __init__(self, ex: Example) -> None:
        self.ex = ex
        self.rec = Recorder()
        self.expected: Expected | None = None  # set by check()
        self.specs: dict[str, StageSpec] = {}
        self.sources: dict[str, SourceSpec] = {}
        self.source_data: dict[str, list[int]] = {}
        self._n = 0
        self.pipeline = self._build()

    def _stage(self, spec: StageSpec) -> Any:
        name = f"s{self._n}_{spec.flavor}_{spec.executor}"
        self._n += 1
        self.specs[name] = spec
        if spec.flavor == "batch":  # a stream=True operator; partial batches must flush
            qs = {} if spec.queue_size is None else {"queue_size": spec.queue_size}
            return ns.batch(spec.fn, spec.timeout, name=name, **qs) | ns.flatten(
                name=f"{name}_flat")
        options: dict[str, Any] = {"name": name}
        if spec.flavor != "sink" or spec.workers > 1:
            options["workers"] = spec.workers
        if not spec.ordered:
            options["ordered"] = False
        if spec.queue_size is not None:
            options["queue_size"] = spec.queue_size
        if spec.on_error == "callback":
            options["on_error"] = self.rec.reporter(name)
        elif spec.on_error != "raise":
            options["on_error"] = spec.on_error
        if spec.fault is not None and spec.fault.kind == "flaky":
            options.update(retries=1, backoff=0)
        if spec.executor == "process":
            options["executor"] = "process"
            fn = ProcessFn(name, spec)
            if spec.flavor == "map":
                return transform(fn, **options)
            if spec.flavor == "flatmap":
                return ns.flat_map(fn, **options)
            return ns.filter(fn, **options)
        return ThreadFn(name, spec, self.rec).stage(options)

    def _source(self, k: int, spec: SourceSpec) -> Any:
        name = f"src{k}"
        self.sources[name] = spec
        data = spec.items(k)
        self.source_data[name] = data
        if not spec.generator:
            return ns.from_iterable(list(data), name=name)
        rec = self.rec
        emitted = rec.emitted.setdefault(name, [])

        def items() -> Any:
            for i, x in enumerate(data):
                if spec.fault is not None and i == spec.at:
                    if spec.fault == "raise":
                        rec.raise_(name, None)
                    elif spec.fault == "slow":
                        rec.fire("slow")
                        time.sleep(spec.delay)
                    elif spec.fault == "block" and rec.first_block(name):
                        rec.block()
                emitted.append(x)  # before the yield: from here on it is the run's
                rec.count()
                yield x
        return source(items, name=name)

    def _chain(self, head: Any, specs: tuple[StageSpec, ...]) -> Any:
        for s in specs:
            st = self._stage(s)
            head = st if head is None else head | st
        return head

    def _build(self) -> Any:
        g = self.ex.graph
        heads = [self._chain(self._source(k, src), chain) for k, (src, chain)
                 in enumerate(g.sources)]
        p = heads[0] if len(heads) == 1 else ns.merge(*heads)
        # a segment: the chain built on its own first, then piped in whole
        p = p | self._chain(None, g.pre) if g.segment and g.pre else self._chain(p, g.pre)
        if g.branches:
            branches = []
            for i, b in enumerate(g.branches):
                seg = self._chain(None, b)
                last_open = g.open_end and i == len(g.branches) - 1
                if not g.merge and not last_open:
                    seg = self._stage(g.final_sink) if seg is None else seg | self._stage(
                        g.final_sink)
                branches.append(seg)
            p = p | tuple(branches)
            if not g.merge:
                return p
        p = self._chain(p, g.post)
        if not g.open_end:
            p = p | self._stage(g.final_sink)
        return p if isinstance(p, Pipeline) else Pipeline.of(p)  # a source alone


# -- plain Python: what the graph computes over what the sources emitted ---------------

class Expected:
    def __init__(self) -> None:
        self.sinks: dict[str, Counter[int]] = {}
        self.open: Counter[int] = Counter()
        self.failing: dict[str, Counter[int]] = {}   # name -> items that fail for good
        self.hits: Counter[str] = Counter()          # fault kind -> items hit (process stages)


def simulate(b: Built, emitted: dict[str, list[int]]) -> Expected:
    """Walk the graph the way :meth:`Built._build` made it, in the same naming order."""
    exp = Expected()
    names = iter(b.specs)
    g = b.ex.graph

    def chain(xs: list[int], specs: tuple[StageSpec, ...]) -> list[int]:
        for s in specs:
            xs = stage(xs, s)
        return xs

    def stage(xs: list[int], s: StageSpec) -> list[int]:
        name = next(names)
        assert b.specs[name] == s
        out: list[int] = []
        fails = exp.failing.setdefault(name, Counter())
        if s.flavor == "batch":
            return list(xs)  # batches, then flattened: every item, in order
        for x in xs:
            if s.fault is not None and s.fault.hits(x) and s.executor == "process":
                exp.hits[s.fault.kind] += 1
            if s.failing(x):
                fails[x] += 1
                continue
            if s.flavor == "sink":
                exp.sinks.setdefault(name, Counter())[x] += 1
            else:
                out.extend(apply(s.flavor, s.fn, x))
        return out

    streams = [chain(emitted[f"src{k}"], head) for k, (_, head) in enumerate(g.sources)]
    xs = [x for s in streams for x in s]
    xs = chain(xs, g.pre)
    if g.branches:
        outs = []
        for i, br in enumerate(g.branches):
            ys = chain(xs, br)
            last_open = g.open_end and i == len(g.branches) - 1
            if g.merge:
                outs.extend(ys)
            elif last_open:
                exp.open.update(ys)
            else:
                stage(ys, g.final_sink)
        if not g.merge:
            return exp
        xs = outs
    xs = chain(xs, g.post)
    if g.open_end:
        exp.open.update(xs)
    else:
        stage(xs, g.final_sink)
    return exp


# -- running and checking ---------------------------------------------------------------

def _worker_processes() -> list[Any]:
    """Live (or unreaped) ``nanostream._worker`` children of this process."""
    import psutil
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "nanostream._worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.ZombieProcess:
            out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _stacks() -> str:
    with tempfile.TemporaryFile() as buf:
        faulthandler.dump_traceback(buf.fileno(), all_threads=True)
        buf.seek(0)
        return buf.read().decode(errors="replace")


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Failure(AssertionError):
    pass


@dataclass
class Outcome:
    error: BaseException | None = None
    other: list[BaseException] = field(default_factory=list)
    collected: list[int] = field(default_factory=list)
    aborted_by_test: bool = False
    action_at: float = 0.0
    ended_at: float | None = None
    release_late: bool = False
    thread_lag: float = 0.0   # seconds from the run's end to its last thread's end


def run_example(ex: Example, tally: Tally | None = None) -> None:
    """Build, run and check one example; raise :class:`Failure` naming what broke."""
    b = Built(ex)
    rec = b.rec
    rec.trigger_at = max(1, ex.trigger)
    threads_before = set(threading.enumerate())
    procs_before = {p.pid for p in _worker_processes()}
    logger = logging.getLogger("nanostream")
    cap = _LogCapture()
    logger.addHandler(cap)
    out = Outcome()
    fuse, Run.fuse = Run.fuse, ex.fuse
    try:
        run = Run(b.pipeline, collect=ex.graph.open_end)
    finally:
        Run.fuse = fuse
    t0 = time.monotonic()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            driver = threading.Thread(target=_drive, args=(ex, run, rec, out),
                                      name="fault:driver", daemon=True)
            releaser = threading.Thread(target=_release, args=(ex, run, rec, out),
                                        name="fault:releaser", daemon=True)
            driver.start()
            releaser.start()
            driver.join(3 * BOUND)
            if driver.is_alive():
                raise Failure(f"the test's driver did not finish within {3 * BOUND:g} s "
                              f"(action {ex.action!r}); stacks:\n{_stacks()}")
            releaser.join(BOUND)
            if releaser.is_alive():
                raise Failure("the releaser did not finish")
        check(b, run, out, caught, cap.records, threads_before, procs_before)
    finally:
        rec.release.set()
        logger.removeHandler(cap)
        if not run._done.is_set() or ns.running():
            ns.stop_all(drain=False)
    if tally is not None:
        tally.add(ex, b, out, time.monotonic() - t0)


def _stopping(run: Run) -> bool:
    return run._aborted or run._done.is_set() or any(
        r.stop_requested for r in run.runners if r.stage.kind == "source")


def _release(ex: Example, run: Run, rec: Recorder, out: Outcome) -> None:
    """Free a blocked stage once the test's stop (or an abort) is under way; when nothing
    stops the run, after the example's hold. With a timeout (stop's or run's) only the
    abort that the timeout brings frees it. Past RELEASE_AFTER the run missed a stop."""
    deadline = time.monotonic() + RELEASE_AFTER
    reached_at: float | None = None
    by_abort = ex.timeout is not None and ex.action in ("stop", "timeout")
    try:
        while not rec.release.is_set():
            if run._started and (run._aborted or run._done.is_set()
                                 or (not by_abort and _stopping(run))):
                break
            if rec.block_reached.is_set():
                if reached_at is None:
                    reached_at = time.monotonic()
                if ex.action in ("end", "collect", "break") and \
                        time.monotonic() - reached_at >= ex.hold:
                    break
            if time.monotonic() > deadline:
                out.release_late = rec.block_reached.is_set()
                break
            run._abort_event.wait(0.001)
    finally:
        rec.release.set()


def _stop_too(run: Run, drain: bool, out: Outcome) -> None:
    try:
        run.stop(drain=drain)
    except BaseException as exc:
        out.other.append(exc)


def _drive(ex: Example, run: Run, rec: Recorder, out: Outcome) -> None:
    try:
        if ex.action in ("collect", "break"):
            gen = run.iterate()
            try:
                for x in gen:
                    out.collected.append(x)
                    if ex.action == "break" and len(out.collected) >= ex.trigger:
                        out.aborted_by_test = True
                        out.action_at = time.monotonic()
                        break
            except StageError as err:
                out.error = err
            finally:
                gen.close()  # what CPython does as the loop's iterator goes away
            if out.error is None:
                out.action_at = out.action_at or time.monotonic()
            else:
                out.action_at = time.monotonic()
        elif ex.action == "timeout":
            out.action_at = time.monotonic()
            try:
                run.run_to_end(ex.timeout)
            except TimeoutError:
                out.aborted_by_test = True
            except StageError as err:
                out.error = err
        else:
            run.start()
            if ex.action == "stop":
                while ex.trigger and not rec.trigger.wait(0.002):
                    if run._done.is_set():
                        break
                out.action_at = time.monotonic()
                out.aborted_by_test = not ex.drain or ex.second_stop
                other = None
                if ex.second_stop:
                    other = threading.Thread(target=_stop_too, args=(run, not ex.drain, out),
                                             name="fault:second-stop", daemon=True)
                    other.start()
                run.stop(drain=ex.drain, timeout=ex.timeout)
                if other is not None:
                    other.join(BOUND)
                out.aborted_by_test |= run._aborted  # the drain's timeout abandoned the rest
            else:
                out.action_at = time.monotonic()
            try:
                if not run.join(BOUND):
                    return
            except StageError as err:
                out.error = err
        if run._done.is_set():
            out.ended_at = time.monotonic()
        try:  # a second join raises the same error again (or nothing)
            run.join(1.0)
        except BaseException as again:
            if again is not out.error:
                out.other.append(again)
    except BaseException as exc:
        out.other.append(exc)


def check(b: Built, run: Run, out: Outcome, caught: list[warnings.WarningMessage],
          logs: list[logging.LogRecord], threads_before: set[threading.Thread],
          procs_before: set[int]) -> None:
    ex, rec = b.ex, b.rec
    problems: list[str] = []

    # -- the run ends within the bound
    if out.ended_at is None or not run._done.is_set():
        raise Failure(f"the run did not end within {BOUND:g} s of the test's action "
                      f"({ex.action}, drain={ex.drain}); stacks:\n{_stacks()}")
    if out.ended_at - out.action_at > BOUND:
        problems.append(f"the run took {out.ended_at - out.action_at:.1f} s to end")
    if out.release_late:
        problems.append(f"a blocked stage was not released within {RELEASE_AFTER:g} s: "
                        "the run neither ended nor stopped")
    if ns.running():
        problems.append(f"runs still listed: {ns.running()}")

    # -- no process and no thread left behind (processes at once; threads may be in
    # their last instructions after telling the run they are done)
    procs = [p for p in _worker_processes() if p.pid not in procs_before]
    if procs:
        problems.append(f"worker processes outlived the run: {[p.pid for p in procs]}")
    deadline = time.monotonic() + 2.0
    for t in threading.enumerate():
        if t not in threads_before and t.name.startswith("nanostream"):
            t.join(max(0.0, deadline - time.monotonic()))
    out.thread_lag = time.monotonic() - out.ended_at
    left = [t.name for t in threading.enumerate()
            if t not in threads_before and t.is_alive() and not t.name.startswith("fault:")]
    if left:
        problems.append(f"threads left behind: {left}")

    # -- nothing warned, logged, or raised besides the one StageError
    for w in caught:
        problems.append(f"warning: {w.category.__name__}: {w.message}")
    for r in logs:
        problems.append(f"log {r.levelname}: {r.getMessage()}")
    for exc in out.other:
        problems.append("unexpected exception: " + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)))

    # -- the error: exactly one StageError naming a stage and item that really failed
    err = out.error
    report = {s.name: s for s in run.stats().stages}
    raise_stages = {n for n, s in b.specs.items() if s.on_error == "raise"
                    and s.fault is not None and s.fault.kind == "raise"}
    raise_sources = {n for n, s in b.sources.items() if s.fault == "raise"}
    fired = {n for n in raise_stages | raise_sources if rec.raised.get(n)}
    fired |= {n for n in raise_stages if b.specs[n].executor == "process"
              and report[n].errors}
    if err is not None:
        problems.extend(_check_error(b, err))
    elif fired and not out.aborted_by_test:
        problems.append(f"stage(s) {sorted(fired)} failed under on_error='raise' but no "
                        "error surfaced")

    # -- every item handled or reported
    emitted = dict(rec.emitted)
    for name, spec in b.sources.items():
        if not spec.generator:
            emitted[name] = b.source_data[name][:report[name].items_out]
    exp = simulate(b, emitted)
    got_sinks = {n: Counter(v) for n, v in rec.sinks.items()}
    got_open = Counter(out.collected)
    if err is None and not out.aborted_by_test and run._aborted:
        problems.append("the run was aborted, but neither the test nor an error asked for it")
    complete = err is None and not out.aborted_by_test and not run._aborted
    if complete:
        for name in set(exp.sinks) | set(got_sinks):
            want, got = exp.sinks.get(name, Counter()), got_sinks.get(name, Counter())
            if want != got:
                problems.append(f"sink {name!r}: missing {sorted((want - got).elements())[:10]}"
                                f", unexpected {sorted((got - want).elements())[:10]}")
        if ex.graph.open_end and exp.open != got_open:
            problems.append(f"the loop: missing {sorted((exp.open - got_open).elements())[:10]}"
                            f", unexpected {sorted((got_open - exp.open).elements())[:10]}")
        for name, spec in b.specs.items():
            want_n = sum(exp.failing[name].values())
            if spec.on_error != "raise" and report[name].errors != want_n:
                problems.append(f"stage {name!r} counted {report[name].errors} errors, "
                                f"{want_n} items failed")
            if spec.on_error == "callback":
                got_cb = Counter(rec.reported.get(name, []))
                if got_cb != exp.failing[name]:
                    problems.append(f"on_error callback of {name!r} got {sorted(got_cb)}, "
                                    f"failing items {sorted(exp.failing[name])}")
            if spec.on_error == "raise" and want_n:
                problems.append(f"stage {name!r} should have failed the run on "
                                f"{sorted(exp.failing[name])[:5]}")
    else:  # aborted: nothing arrived that plain Python would not produce
        for name, got in got_sinks.items():
            extra = got - exp.sinks.get(name, Counter())
            if extra:
                problems.append(f"sink {name!r} got items plain Python does not produce: "
                                f"{sorted(extra.elements())[:10]}")
        extra = got_open - exp.open
        if extra:
            problems.append(f"the loop got {sorted(extra.elements())[:10]} which plain Python "
                            "does not produce")
    b.expected = exp
    if problems:
        raise Failure(f"{len(problems)} invariant(s) broken for {ex}:\n- "
                      + "\n- ".join(problems))


def _check_error(b: Built, err: BaseException) -> list[str]:
    problems = []
    if not isinstance(err, StageError):
        return [f"the run raised {type(err).__name__}: {err}, not a StageError"]
    cause = err.__cause__
    if not isinstance(cause, Boom):
        return [f"the StageError is chained to {type(cause).__name__}: {cause!r}, "
                "not the injected Boom"]
    stage, item = cause.args
    if err.stage != stage:
        problems.append(f"the StageError names stage {err.stage!r}; {stage!r} failed")
    if stage in b.sources:
        if err.has_item:
            problems.append(f"a source's error names an item: {err.item!r}")
        if b.sources[stage].fault != "raise":
            problems.append(f"source {stage!r} had no raise fault")
        return problems
    spec = b.specs.get(stage)
    if spec is None or spec.on_error != "raise" or not spec.failing(item):
        problems.append(f"stage {stage!r} should not fail the run on {item!r}")
    if not err.has_item or err.item != item:
        problems.append(f"the StageError names item {err.item!r}; {item!r} failed")
    if spec is not None and spec.executor != "process" and item not in b.rec.raised.get(stage, []):
        problems.append(f"{stage!r} never raised on {item!r}")
    if spec is not None and spec.executor == "process" and not isinstance(
            cause.__cause__, RemoteTraceback):
        problems.append(f"the error of process stage {stage!r} lost its remote traceback")
    if isinstance(cause.__cause__, StageError) or isinstance(cause.__context__, StageError):
        problems.append("the injected error is chained to another StageError")
    return problems


# -- the tally ---------------------------------------------------------------------------

class Tally:
    """Counts over every example run (hypothesis' shrinking included)."""

    def __init__(self) -> None:
        self.examples = 0
        self.seconds = 0.0
        self.actions: Counter[str] = Counter()
        self.executors: Counter[str] = Counter()
        self.shapes: Counter[str] = Counter()
        self.planned: Counter[str] = Counter()
        self.fired: Counter[str] = Counter()
        self.errors_surfaced = 0
        self.stages = 0
        self.max_thread_lag = 0.0

    def add(self, ex: Example, b: Built, out: Outcome, seconds: float) -> None:
        self.examples += 1
        self.seconds += seconds
        label = {"end": "run to the end", "collect": "iterate to the end",
                 "break": "break out of the loop", "timeout": "run(timeout=...)"}.get(
            ex.action, f"stop(drain={ex.drain}{', timeout' if ex.timeout is not None else ''})"
            + (" + a concurrent stop" if ex.second_stop else ""))
        self.actions[label] += 1
        g = ex.graph
        self.shapes["fan-in" if len(g.sources) > 1 else "one source"] += 1
        if g.branches:
            self.shapes["fan-out + fan-in" if g.merge else "fan-out"] += 1
        if g.segment and g.pre:
            self.shapes["segment"] += 1
        if any(s.flavor == "batch" for s in b.specs.values()):
            self.shapes["batch + flatten"] += 1
        for spec in b.specs.values():
            self.stages += 1
            self.executors[spec.executor] += 1
            if spec.fault is not None:
                self.planned[spec.fault.kind] += 1
        for spec in b.sources.values():
            if spec.fault is not None:
                self.planned[f"source {spec.fault}"] += 1
        self.fired.update(b.rec.fired)
        if b.expected is not None:
            self.fired.update(b.expected.hits)  # process stages: the items their faults hit
        if out.error is not None:
            self.errors_surfaced += 1
        self.max_thread_lag = max(self.max_thread_lag, out.thread_lag)

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "seconds": round(self.seconds, 1),
                "stages": self.stages, "errors_surfaced": self.errors_surfaced,
                "max_seconds_from_run_end_to_last_thread_end": round(self.max_thread_lag, 3),
                "actions": dict(self.actions), "executors": dict(self.executors),
                "shapes": dict(self.shapes), "faults_planned": dict(self.planned),
                "faults_fired": dict(self.fired)}


# -- strategies (hypothesis imported here only) ------------------------------------------

def examples_strategy(process_share: int = 1, force_skip: bool = False) -> Any:
    """Random examples. ``process_share``: in how many of 12 stage draws the executor
    is a process (when the stage may be one); ``force_skip``: every stage skips."""
    from hypothesis import strategies as st

    @st.composite
    def faults(draw: Any, executor: str) -> Fault | None:
        kinds = ["raise", "slow", "flaky"] + ([] if executor == "process" else ["block"])
        if draw(st.integers(0, 2)) == 0:
            return None
        kind = draw(st.sampled_from(kinds))
        modulus = draw(st.sampled_from([1, 2, 5, 13, 40])) if kind != "block" else \
            draw(st.sampled_from([1, 3, 10]))
        if kind == "slow":
            modulus = max(modulus, 2)
        return Fault(kind, modulus, draw(st.integers(0, 97)),
                     draw(st.sampled_from([0.0005, 0.002])),
                     kind == "block" and executor == "async" and draw(st.booleans()))

    @st.composite
    def stages(draw: Any, flavor: str | None = None, allow_process: bool = True) -> StageSpec:
        if flavor is None and draw(st.integers(0, 7)) == 0:
            return StageSpec("batch", draw(st.integers(1, 4)),
                             queue_size=draw(st.sampled_from([None, 1, 8])),
                             timeout=draw(st.sampled_from([None, 0.001, 0.01])))
        flavor = flavor or draw(st.sampled_from(FLAVORS))
        roll = draw(st.integers(0, 11))
        if roll < process_share and allow_process and flavor != "sink":
            executor = "process"
        elif roll >= 9:
            executor = "async"
        else:
            executor = "thread"
        workers = draw(st.integers(1, 2 if executor == "process" else 4))
        on_error = "skip" if force_skip else draw(st.sampled_from(["raise", "skip",
                                                                   "callback"]))
        return StageSpec(flavor, draw(st.integers(0, len(FUNCTIONS[flavor]) - 1)), workers,
                         draw(st.booleans()), executor, on_error,
                         draw(st.sampled_from([None, None, 1, 2, 8])),
                         draw(faults(executor)))

    @st.composite
    def sources(draw: Any) -> SourceSpec:
        n = draw(st.one_of(st.integers(0, 40), st.integers(0, 300)))
        generator = draw(st.booleans())
        fault = None
        if generator and draw(st.integers(0, 3)) == 0:
            fault = draw(st.sampled_from(["slow", "block"] + ([] if force_skip else ["raise"])))
        return SourceSpec(n, generator, fault, draw(st.integers(0, max(0, n - 1))),
                          draw(st.sampled_from([0.0005, 0.002])))

    @st.composite
    def graphs(draw: Any, open_end: bool) -> Graph:
        # at most one process stage per graph: each process worker costs ~60 ms to start
        budget = [1]

        def one(flavor: str | None = None) -> StageSpec:
            s = draw(stages(flavor, allow_process=budget[0] > 0))
            if s.executor == "process":
                budget[0] -= 1
            return s

        def chain(lo: int, hi: int) -> tuple[StageSpec, ...]:
            return tuple(one() for _ in range(draw(st.integers(lo, hi))))

        n_sources = draw(st.sampled_from([1, 1, 1, 2]))
        srcs = tuple((draw(sources()), chain(0, 1) if n_sources > 1 else ())
                     for _ in range(n_sources))
        pre = chain(0, 3)
        segment = draw(st.booleans())
        branches: tuple[tuple[StageSpec, ...], ...] = ()
        merge = False
        if draw(st.integers(0, 2)) == 0:
            merge = draw(st.booleans())
            branches = tuple(chain(1, 2) for _ in range(draw(st.integers(2, 3))))
        post = chain(0, 2) if not branches or merge else ()
        if open_end and not post and (merge or (not branches and not pre and n_sources > 1)):
            post = (one(),)  # the loop takes one open end, not the merged branches' two
        return Graph(srcs, pre, segment, branches, merge, post, open_end, one("sink"))

    @st.composite
    def examples(draw: Any) -> Example:
        action = draw(st.sampled_from(["end", "stop", "stop", "collect", "break",
                                       "timeout"]))
        graph = draw(graphs(open_end=action in ("collect", "break")))
        drain = draw(st.booleans())
        timeout = None
        if action == "timeout" or (action == "stop" and drain and draw(st.booleans())):
            timeout = draw(st.sampled_from([0.0, 0.02, 0.2]))
        return Example(graph, action, drain,
                       draw(st.integers(0 if action == "stop" else 1, 30)),
                       draw(st.sampled_from([0.0, 0.005])), draw(st.booleans()), timeout,
                       action == "stop" and draw(st.integers(0, 3)) == 0)

    return examples()


def write_tally(tally: Tally, path: str) -> None:
    import json
    with open(path, "w") as f:
        json.dump(tally.as_dict(), f, indent=2, sort_keys=True)
        f.write("\n")


__all__ = ["BOUND", "Example", "Fault", "Graph", "SourceSpec", "StageSpec", "Tally",
           "examples_strategy", "run_example", "simulate", "write_tally"]

