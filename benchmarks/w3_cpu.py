"""W3 - CPU-bound pure-Python function (~40 ms a call) on 2 worker processes.

    ns.from_iterable(items) | transform(work, executor="process", workers=2) | sink(collect)

``work`` is a closure over the calibrated loop count (so the process executor has to
ship it with cloudpickle, as DESIGN.md promises). The loop count is calibrated once
per suite run so that one call takes ~40 ms on this machine.

Baseline ("limit"): the serial loop in this process. The ratio column is the
speed-up over it (serial time / measured time). Times include starting and stopping
the worker processes. Peers: ``multiprocessing.Pool(2).imap`` (with the platform's
default start method and with forkserver, which is what nanostream must use) and a
pypeln process map with 2 workers. Target: nanostream >= 1.7x serial. Every run
checks the results against the serial results (in order, except pypeln, which does
not keep order).
"""

from __future__ import annotations

import functools
import multiprocessing
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

WORKERS = 2


def burn(x: int, loops: int) -> int:
    """Pure-Python CPU work: an LCG iterated ``loops`` times."""
    acc = x
    for _ in range(loops):
        acc = (acc * 1103515245 + 12345) & 0x7FFFFFFF
    return acc


def make_work(loops: int):
    def work(x):
        return burn(x, loops)

    return work


def calibrate(p: dict[str, Any]) -> str:
    """Pick the loop count for ~call_ms of CPU per call.

    Calibrated on CPU time (``time.thread_time``), not wall time, so that other load
    on a shared machine does not change the amount of work per item.
    """
    probe = 100_000
    best = min(_cpu_time(probe) for _ in range(5))
    loops = max(1, int(probe * p["call_ms"] / 1000 / best))
    cpu = min(_cpu_time(loops) for _ in range(3))
    t0 = time.perf_counter()
    p["expected"] = [burn(x, loops) for x in range(p["n"])]  # correctness reference
    wall = (time.perf_counter() - t0) / p["n"]
    p["loops"] = loops
    p["call_cpu_ms"] = round(cpu * 1000, 1)
    p["call_wall_ms"] = round(wall * 1000, 1)
    return (
        f"calibrated {loops:,} loops = {cpu * 1000:.1f} ms CPU per call"
        f" ({wall * 1000:.1f} ms wall in a serial pass); {p['n']} items"
    )


def _cpu_time(loops: int) -> float:
    t0 = time.thread_time()
    burn(1, loops)
    return time.thread_time() - t0


def _check(p: dict[str, Any], out: list, ordered: bool = True) -> None:
    exp = p["expected"]
    assert len(out) == len(exp), f"got {len(out)} results, expected {len(exp)}"
    assert (out if ordered else sorted(out)) == (exp if ordered else sorted(exp)), "wrong results"


def run_serial(p: dict[str, Any]) -> float:
    work = make_work(p["loops"])
    with Stopwatch() as sw:
        out = [work(x) for x in range(p["n"])]
    _check(p, out)
    return sw.seconds


def run_nanostream(p: dict[str, Any]) -> float:
    import nanostream as ns
    from nanostream import sink, transform

    work = make_work(p["loops"])
    out: list = []
    with Stopwatch() as sw:
        pipeline = (
            ns.from_iterable(range(p["n"]))
            | transform(work, executor="process", workers=WORKERS)
            | sink(out.append)
        )
        pipeline.run()
    _check(p, out)
    return sw.seconds


def _pool(method: str | None):
    def run(p: dict[str, Any]) -> float:
        ctx = multiprocessing.get_context(method)
        work = functools.partial(burn, loops=p["loops"])  # picklable without cloudpickle
        with Stopwatch() as sw, ctx.Pool(WORKERS) as pool:
            out = list(pool.imap(work, range(p["n"])))
        _check(p, out)
        return sw.seconds

    return run


def run_pypeln_process(p: dict[str, Any]) -> float:
    import pypeln as pl

    work = functools.partial(burn, loops=p["loops"])
    with Stopwatch() as sw:
        out = list(pl.process.map(work, range(p["n"]), workers=WORKERS))
    _check(p, out, ordered=False)
    return sw.seconds


def params(quick: bool) -> dict[str, Any]:
    if quick:  # a smoke run: process start-up dominates, the speed-up means little
        return {"n": 4, "call_ms": 20}
    return {"n": 60, "call_ms": 40}


_default_method = (
    multiprocessing.get_start_method(allow_none=True)
    or (multiprocessing.get_all_start_methods()[0])
)

register(
    Workload(
        id="W3",
        title="{n} x CPU-bound {call_ms} ms, process, workers=2",
        unit="s",
        params=params,
        setup=calibrate,
        contenders=[
            Contender("nanostream", run_nanostream, SUBJECT, requires=("nanostream",)),
            Contender("serial loop", run_serial, LIMIT),
            Contender("multiprocessing.Pool(2).imap", _pool(None), PEER, note=f"{_default_method}"),
            Contender("multiprocessing.Pool(2).imap", _pool("forkserver"), PEER, note="forkserver")
            if "forkserver" in multiprocessing.get_all_start_methods()
            else Contender("multiprocessing.Pool(2).imap", _pool("spawn"), PEER, note="spawn"),
            Contender(
                "pypeln process map(workers=2)", run_pypeln_process, PEER, requires=("pypeln",)
            ),
        ],
        target=Target(">= 1.7x serial", lambda value, ratio: ratio is not None and ratio >= 1.7),
        ratio=lambda value, base: base / value,
    )
)
