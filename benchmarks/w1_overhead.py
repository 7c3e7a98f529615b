"""W1 - per-item overhead on 1M ints.

    ns.from_iterable(range(n)) | transform(inc) | ns.filter(odd) | sink(count)

``inc`` is ``lambda x: x + 1`` written as a named function; every contender calls the
same three functions (inc, odd, count), so the difference between rows is the
framework's own cost. Baseline ("limit"): the same calls in a plain ``for`` loop.
Target: nanostream >= 0.40x the loop's items/s.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from benchmarks._harness import (
    LIMIT,
    PEER,
    REFERENCE,
    SUBJECT,
    Contender,
    Stopwatch,
    Target,
    Workload,
    register,
)


def inc(x):
    return x + 1


def odd(x):
    return x % 2 == 1


def make_count():
    """A sink function that counts calls; ``box[0]`` holds the count."""
    box = [0]

    def count(x):
        box[0] += 1

    return count, box


def expected(n: int) -> int:
    return (n + 1) // 2  # odd numbers among inc(range(n)) = 1..n


def _rate(n: int, seconds: float, got: int) -> float:
    assert got == expected(n), f"counted {got}, expected {expected(n)}"
    return n / seconds


# ---------------------------------------------------------------- contenders


def run_nanostream(p: dict[str, Any]) -> float:
    import nanostream as ns
    from nanostream import sink, transform

    n = p["n"]
    count, box = make_count()
    with Stopwatch() as sw:
        pipeline = ns.from_iterable(range(n)) | transform(inc) | ns.filter(odd) | sink(count)
        pipeline.run()
    return _rate(n, sw.seconds, box[0])


def run_loop(p: dict[str, Any]) -> float:
    n = p["n"]
    count, box = make_count()
    with Stopwatch() as sw:
        for x in range(n):
            y = inc(x)
            if odd(y):
                count(y)
    return _rate(n, sw.seconds, box[0])


def run_loop_inlined(p: dict[str, Any]) -> float:
    n = p["n"]
    with Stopwatch() as sw:
        c = 0
        for x in range(n):
            y = x + 1
            if y % 2 == 1:
                c += 1
    return _rate(n, sw.seconds, c)


def run_toolz(p: dict[str, Any]) -> float:
    import toolz
    from toolz import curried

    n = p["n"]
    count, box = make_count()
    with Stopwatch() as sw:
        # count(filter(odd, map(inc, range(n)))) style, ending in the same sink call
        toolz.pipe(
            range(n),
            curried.map(inc),
            curried.filter(odd),
            curried.map(count),
            lambda it: deque(it, maxlen=0),
        )
    return _rate(n, sw.seconds, box[0])


def run_pypeln_thread(p: dict[str, Any]) -> float:
    import pypeln as pl

    n = p["pypeln_n"]  # pypeln moves ~20k items/s here: 1M items would take a minute
    count, box = make_count()
    with Stopwatch() as sw:
        stage = pl.thread.map(inc, range(n))
        stage = pl.thread.filter(odd, stage)
        pl.thread.each(count, stage, run=True)
    return _rate(n, sw.seconds, box[0])


def run_streamz(p: dict[str, Any]) -> float:
    from streamz import Stream

    n = p["n"]
    count, box = make_count()
    with Stopwatch() as sw:
        src = Stream()
        src.map(inc).filter(odd).sink(count)
        emit = src.emit
        for x in range(n):
            emit(x)
    return _rate(n, sw.seconds, box[0])


def run_bytewax(p: dict[str, Any]) -> float:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import TestingSource, run_main

    n = p["n"]
    count, box = make_count()

    class _Part(StatelessSinkPartition):
        def write_batch(self, items):
            for x in items:
                count(x)

    class CountSink(DynamicSink):
        def build(self, step_id, worker_index, worker_count):
            return _Part()

    with Stopwatch() as sw:
        flow = Dataflow("w1")
        s = op.input("inp", flow, TestingSource(range(n), batch_size=p["bytewax_batch"]))
        s = op.map("inc", s, inc)
        s = op.filter("odd", s, odd)
        op.output("out", s, CountSink())
        run_main(flow)
    return _rate(n, sw.seconds, box[0])


def params(quick: bool) -> dict[str, Any]:
    if quick:
        return {"n": 50_000, "pypeln_n": 5_000, "bytewax_batch": 1000}
    return {"n": 1_000_000, "pypeln_n": 100_000, "bytewax_batch": 1000}


register(
    Workload(
        id="W1",
        title="{n:,} ints: inc | filter(odd) | count",
        unit="items/s",
        params=params,
        contenders=[
            Contender("nanostream", run_nanostream, SUBJECT, requires=("nanostream",)),
            Contender("plain for loop (inc, odd, count)", run_loop, LIMIT),
            Contender("plain for loop, ops inlined", run_loop_inlined, REFERENCE),
            Contender("toolz pipe(map, filter, map)", run_toolz, PEER, requires=("toolz",)),
            Contender(
                "pypeln thread map|filter|each",
                run_pypeln_thread,
                PEER,
                requires=("pypeln",),
                note="n={pypeln_n:,}",
            ),
            Contender("streamz Stream.map.filter.sink", run_streamz, PEER, requires=("streamz",)),
            Contender(
                "bytewax dataflow run_main",
                run_bytewax,
                PEER,
                requires=("bytewax",),
                note="batch_size={bytewax_batch}",
            ),
        ],
        target=Target(">= 0.40x loop", lambda value, ratio: ratio is not None and ratio >= 0.40),
        ratio=lambda value, base: value / base,
    )
)
