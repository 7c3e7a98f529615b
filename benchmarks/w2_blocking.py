"""W2 - blocking I/O fan-out: 2000 items, ``time.sleep(0.005)`` each, 32 workers, ordered.

    ns.from_iterable(range(N)) | transform(blocking_call, workers=32, ordered=True) | sink(collect)

Baseline ("limit"): the ideal time N x 5 ms / 32. The ratio column is the share of
ideal reached (ideal time / measured time). Peers: ``ThreadPoolExecutor(32).map`` and
a pypeln thread map with 32 workers (``pl.thread.ordered`` to keep input order).
Target: nanostream >= 90 % of ideal. Every run checks that all N results arrived in
input order.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks._harness import (
    LIMIT,
    PEER,
    SUBJECT,
    Contender,
    Stopwatch,
    Target,
    Workload,
    register,
)

SLEEP = 0.005
WORKERS = 32


def blocking_call(x):
    time.sleep(SLEEP)
    return x


def _check(n: int, out: list) -> None:
    assert len(out) == n, f"got {len(out)} results, expected {n}"
    assert out == list(range(n)), "results not in input order"


def run_ideal(p: dict[str, Any]) -> float:
    return p["n"] * SLEEP / WORKERS


def run_nanostream(p: dict[str, Any]) -> float:
    import nanostream as ns
    from nanostream import sink, transform

    n = p["n"]
    out: list = []
    with Stopwatch() as sw:
        pipeline = (
            ns.from_iterable(range(n))
            | transform(blocking_call, workers=WORKERS, ordered=True)
            | sink(out.append)
        )
        pipeline.run()
    _check(n, out)
    return sw.seconds


def run_thread_pool(p: dict[str, Any]) -> float:
    from concurrent.futures import ThreadPoolExecutor

    n = p["n"]
    with Stopwatch() as sw, ThreadPoolExecutor(WORKERS) as ex:
        out = list(ex.map(blocking_call, range(n)))
    _check(n, out)
    return sw.seconds


def run_pypeln_thread(p: dict[str, Any]) -> float:
    import pypeln as pl

    n = p["n"]
    with Stopwatch() as sw:
        out = list(pl.thread.ordered(pl.thread.map(blocking_call, range(n), workers=WORKERS)))
    _check(n, out)
    return sw.seconds


def params(quick: bool) -> dict[str, Any]:
    return {"n": 320 if quick else 2000}


register(
    Workload(
        id="W2",
        title="{n} x sleep(5 ms), workers=32, ordered",
        unit="s",
        params=params,
        contenders=[
            Contender("nanostream", run_nanostream, SUBJECT, requires=("nanostream",)),
            Contender("ideal N x 5 ms / 32", run_ideal, LIMIT),
            Contender("ThreadPoolExecutor(32).map", run_thread_pool, PEER),
            Contender(
                "pypeln thread map(workers=32) + ordered",
                run_pypeln_thread,
                PEER,
                requires=("pypeln",),
            ),
        ],
        target=Target(">= 90% of ideal", lambda value, ratio: ratio is not None and ratio >= 0.90),
        ratio=lambda value, base: base / value,
        ratio_style="%",
    )
)
