"""W9 - a tumbling count window (sum per window) over 1M ints.

    ns.from_iterable(range(n)) | ns.tumbling(size=100, agg=sum) | sink(collect)

Baseline ("limit"): the plain toolz equivalent, ``map(sum, partition_all(100, range(n)))``.
Target: nanostream within 2x of it (>= 0.50x its items/s).

Reference rows separate the window operator's own cost from the pipeline's:

* the same window stage called directly on ``range(n)`` (a stage called with its
  input runs its function: no threads, no channels);
* the runtime floor: the same pipeline with a ``stream=True`` stage that only counts,
  i.e. what moving 1M items from a source thread to a stage thread costs;
* an event-time window (``tumbling(seconds=100, timestamp=...)``, direct call), the
  per-item cost of windows by time.

Peer: streamz ``Stream().partition(100).map(sum).sink(...)`` fed by ``emit``, on 10k
items (its rate falls as the stream grows: ~12k items/s at 1k items, ~5k at 20k, so 1M
would take minutes; the figure is a rate, so it stays comparable).
"""

from __future__ import annotations

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

SIZE = 100


def expected(n: int) -> list[int]:
    return [sum(range(i, min(i + SIZE, n))) for i in range(0, n, SIZE)]


def _rate(p: dict[str, Any], seconds: float, got: list[int]) -> float:
    assert got == p["expected"], "wrong window sums"
    return p["n"] / seconds


def run_nanostream(p: dict[str, Any]) -> float:
    import nanostream as ns

    out: list[Any] = []
    with Stopwatch() as sw:
        (
            ns.from_iterable(range(p["n"])) | ns.tumbling(size=SIZE, agg=sum) | ns.sink(out.append)
        ).run()
    return _rate(p, sw.seconds, [w.value for w in out])


def run_toolz(p: dict[str, Any]) -> float:
    import toolz

    with Stopwatch() as sw:
        got = list(map(sum, toolz.partition_all(SIZE, range(p["n"]))))
    return _rate(p, sw.seconds, got)


def run_direct(p: dict[str, Any]) -> float:
    import nanostream as ns

    with Stopwatch() as sw:
        got = [w.value for w in ns.tumbling(size=SIZE, agg=sum)(range(p["n"]))]
    return _rate(p, sw.seconds, got)


def run_floor(p: dict[str, Any]) -> float:
    import nanostream as ns

    def count(items):
        n = 0
        for _ in items:
            n += 1
        yield n

    out: list[int] = []
    with Stopwatch() as sw:
        (
            ns.from_iterable(range(p["n"])) | ns.transform(count, stream=True) | ns.sink(out.append)
        ).run()
    assert out == [p["n"]]
    return p["n"] / sw.seconds


def run_event_time(p: dict[str, Any]) -> float:
    import nanostream as ns

    stage = ns.tumbling(seconds=SIZE, timestamp=lambda x: x, agg=sum)
    with Stopwatch() as sw:
        got = [w.value for w in stage(range(p["n"]))]
    return _rate(p, sw.seconds, got)


def run_streamz(p: dict[str, Any]) -> float:
    from streamz import Stream

    n = p["streamz_n"]  # streamz's partition slows down as it goes: ~5k items/s at 20k
    out: list[int] = []
    with Stopwatch() as sw:
        src = Stream()
        src.partition(SIZE).map(sum).sink(out.append)
        emit = src.emit
        for x in range(n):
            emit(x)
    assert out == expected(n), "wrong window sums"
    return n / sw.seconds


def params(quick: bool) -> dict[str, Any]:
    n = 50_000 if quick else 1_000_000
    return {"n": n, "expected": expected(n), "streamz_n": 2_000 if quick else 10_000}


register(
    Workload(
        id="W9",
        title="{n:,} ints: tumbling(size=100, agg=sum)",
        unit="items/s",
        params=params,
        contenders=[
            Contender("nanostream", run_nanostream, SUBJECT, requires=("nanostream",)),
            Contender(
                "toolz map(sum, partition_all(100, ...))", run_toolz, LIMIT, requires=("toolz",)
            ),
            Contender(
                "nanostream window stage called directly",
                run_direct,
                REFERENCE,
                requires=("nanostream",),
            ),
            Contender(
                "nanostream floor: source | counting stream stage",
                run_floor,
                REFERENCE,
                requires=("nanostream",),
            ),
            Contender(
                "nanostream event-time tumbling(seconds=100), direct",
                run_event_time,
                REFERENCE,
                requires=("nanostream",),
            ),
            Contender("streamz partition(100).map(sum)", run_streamz, PEER, requires=("streamz",)),
        ],
        target=Target(">= 0.50x toolz", lambda value, ratio: ratio is not None and ratio >= 0.5),
        ratio=lambda value, base: value / base,
    )
)
