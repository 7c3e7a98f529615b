"""W5 - latency of a lone item through an idle 3-stage pipeline.

    feed() | transform(relay) | sink(record)        # source, transform, sink

``feed`` is a ``@source`` generator blocking on ``queue.Queue.get()`` (a sentinel ends
it). Each item is its own ``time.perf_counter()`` send time; the sink records
``perf_counter() - item`` and sets a ``threading.Event``. The driver sends one item,
waits for it to arrive, idles ~2 ms and sends the next: 200 samples per run, no
warm-up excluded. The figure is the p99 (the table also shows p50); the ratio column
is p99 relative to the limit's p99 (lower is better).

Baseline ("limit"): the hand-written equivalent, three threads joined by two
``queue.Queue(maxsize=1024)``. Peers: a pypeln thread map + each over the same
blocking generator; streamz emitting from one feeder thread (synchronous: no hand-off
between stages); bytewax with a polling source partition. Target: nanostream p99 <= 5 ms.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks._harness import (
    LIMIT,
    PEER,
    SUBJECT,
    Contender,
    Measurement,
    Target,
    Workload,
    percentile,
    register,
)

END = object()  # sentinel that ends the source
ARRIVAL_TIMEOUT = 5.0


def relay(t: float) -> float:
    return t


class Probe:
    """Sends lone items and collects their latencies."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.lat: list[float] = []
        self.arrived = threading.Event()

    def record(self, t_sent: float) -> None:
        self.lat.append(time.perf_counter() - t_sent)
        self.arrived.set()

    def blocking_items(self):
        """The body of the source: block on the queue until the sentinel."""
        while True:
            item = self.q.get()
            if item is END:
                return
            yield item

    def sample(self, p: dict[str, Any], alive: Callable[[], bool] = lambda: True) -> Measurement:
        k, idle = p["samples"], p["idle_s"]
        time.sleep(p["settle_s"])  # let the pipeline come up and go idle
        for i in range(k):
            self.arrived.clear()
            self.q.put(time.perf_counter())
            if not self.arrived.wait(ARRIVAL_TIMEOUT):
                raise TimeoutError(f"sample {i} did not arrive within {ARRIVAL_TIMEOUT:g} s")
            time.sleep(idle)
        assert len(self.lat) == k, f"{len(self.lat)} arrivals for {k} items"
        ms = [x * 1000 for x in self.lat]
        return Measurement(percentile(ms, 99), {"p50_ms": percentile(ms, 50), "max_ms": max(ms)})

    def end(self) -> None:
        self.q.put(END)


def _join(t: threading.Thread, what: str) -> None:
    t.join(10)
    assert not t.is_alive(), f"{what} did not stop within 10 s"


# ---------------------------------------------------------------- contenders


def run_nanostream(p: dict[str, Any]) -> Measurement:
    from nanostream import sink, source, transform

    probe = Probe()

    @source
    def feed():
        while True:
            item = probe.q.get()
            if item is END:
                return
            yield item

    pipeline = feed() | transform(relay) | sink(probe.record)
    run = pipeline.start()
    try:
        m = probe.sample(p)
    finally:
        probe.end()
        ended = run.join(timeout=10)
    assert ended, "nanostream run did not end within 10 s after the sentinel"
    return m


def run_threads(p: dict[str, Any]) -> Measurement:
    probe = Probe()
    q1: queue.Queue = queue.Queue(maxsize=1024)
    q2: queue.Queue = queue.Queue(maxsize=1024)

    def src():
        for item in probe.blocking_items():
            q1.put(item)
        q1.put(END)

    def mid():
        for item in iter(q1.get, END):
            q2.put(relay(item))
        q2.put(END)

    def snk():
        for item in iter(q2.get, END):
            probe.record(item)

    threads = [threading.Thread(target=f, daemon=True) for f in (src, mid, snk)]
    for t in threads:
        t.start()
    try:
        m = probe.sample(p)
    finally:
        probe.end()
        for t in threads:
            _join(t, "hand-written thread")
    return m


def run_pypeln_thread(p: dict[str, Any]) -> Measurement:
    import pypeln as pl

    probe = Probe()
    stage = pl.thread.map(relay, probe.blocking_items(), workers=1)
    stage = pl.thread.each(probe.record, stage, workers=1)
    t = threading.Thread(target=pl.thread.run, args=(stage,), daemon=True)
    t.start()
    try:
        m = probe.sample(p)
    finally:
        probe.end()
        _join(t, "pypeln")
    return m


def run_streamz(p: dict[str, Any]) -> Measurement:
    from streamz import Stream

    probe = Probe()
    src = Stream()
    src.map(relay).sink(probe.record)

    def feeder():
        for item in probe.blocking_items():
            src.emit(item)

    t = threading.Thread(target=feeder, daemon=True)
    t.start()
    try:
        m = probe.sample(p)
    finally:
        probe.end()
        _join(t, "streamz feeder")
    return m


def run_bytewax(p: dict[str, Any]) -> Measurement:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.inputs import DynamicSource, StatelessSourcePartition
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import run_main

    probe = Probe()

    class _In(StatelessSourcePartition):
        def next_batch(self):
            # bytewax sources must not block for long: poll with a short timeout
            try:
                item = probe.q.get(timeout=0.0005)
            except queue.Empty:
                return []
            if item is END:
                raise StopIteration
            return [item]

    class QueueSource(DynamicSource):
        def build(self, step_id, worker_index, worker_count):
            return _In()

    class _Out(StatelessSinkPartition):
        def write_batch(self, items):
            for x in items:
                probe.record(x)

    class RecordSink(DynamicSink):
        def build(self, step_id, worker_index, worker_count):
            return _Out()

    flow = Dataflow("w5")
    s = op.input("inp", flow, QueueSource())
    s = op.map("relay", s, relay)
    op.output("out", s, RecordSink())
    errors: list[BaseException] = []

    def main():
        try:
            run_main(flow)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=main, daemon=True)
    t.start()
    try:
        m = probe.sample(p)
    finally:
        probe.end()
        _join(t, "bytewax")
    if errors:
        raise errors[0]
    return m


def fmt(m: Measurement) -> str:
    return f"p50 {m.extra['p50_ms']:.3f} / p99 {m.value:.3f} ms"


def params(quick: bool) -> dict[str, Any]:
    return {"samples": 50 if quick else 200, "idle_s": 0.002, "settle_s": 0.05}


register(
    Workload(
        id="W5",
        title="lone-item latency, idle 3-stage pipeline, {samples} samples",
        unit="ms",
        params=params,
        fmt=fmt,
        contenders=[
            Contender("nanostream", run_nanostream, SUBJECT, requires=("nanostream",)),
            Contender("3 threads + queue.Queue", run_threads, LIMIT),
            Contender("pypeln thread map|each", run_pypeln_thread, PEER, requires=("pypeln",)),
            Contender(
                "streamz map.sink", run_streamz, PEER, requires=("streamz",), note="sync, 1 thread"
            ),
            Contender(
                "bytewax dataflow run_main",
                run_bytewax,
                PEER,
                requires=("bytewax",),
                note="polling source",
            ),
        ],
        target=Target("p99 <= 5 ms", lambda value, ratio: value <= 5.0),
        ratio=lambda value, base: value / base,
    )
)
