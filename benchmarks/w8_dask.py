"""W8 - a CPU-bound transform on a 2-worker Dask LocalCluster (``DaskEngine``).

    ns.from_iterable(items) | transform(work, workers=W) | sink(collect)
    pipeline.run(engine=DaskEngine(client))

``work`` is a pure-Python loop (the W3 function) calibrated to ``item_ms`` per call,
a closure, so it travels by value with cloudpickle. The cluster is a
``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`` started once in
the set-up (a cluster outlives the pipelines it serves); its start-up is not timed,
the engine's work is (shipping the function, chunking, results, cancelling).

Baseline ("limit"): the serial loop in this process; the ratio is the speed-up
(serial time / measured time). Beside it, in the same run: Dask by hand
(``client.map`` over hand-made chunks of the same size the engine reaches, then
``gather``), nanostream's own process executor and thread executor with
``workers=2``, and the engine sending one item per task (``task_seconds=0``) to show
what chunking buys. Target: the engine >= 1.6 x serial.

W8s repeats it with small items (0.1 ms), where the runtime's chunks (at most 1024
items, ~0.1 s) are shorter than ``task_seconds``, and adds the remedy: the items
grouped with ``ns.batch`` before the stage, so that one task computes ~0.2 s. It has
no target (it is not in BENCHMARKS.md); it shows when chunking is not enough.

The set-up also measures the per-task overhead of the engine: trivial items, one
per task, with one task in flight (the round trip) and with eight (throughput).
Every run checks its results against the serial results (in order).
"""

from __future__ import annotations

import atexit
import statistics
import time
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
from benchmarks.w3_cpu import burn

CLUSTER_WORKERS = 2
_cluster: dict[str, Any] = {}


def make_work(loops: int):
    def work(x):
        return burn(x, loops)

    return work


def burn_chunk(xs: list[int], loops: int) -> list[int]:
    return [burn(x, loops) for x in xs]


def client():
    """The suite's LocalCluster client, started on first use, closed at exit."""
    if "client" not in _cluster:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(
            n_workers=CLUSTER_WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
        )
        _cluster["cluster"], _cluster["client"] = cluster, Client(cluster)
        atexit.register(_close)
    return _cluster["client"]


def _close() -> None:
    c, cluster = _cluster.pop("client", None), _cluster.pop("cluster", None)
    if c is not None:
        c.close()
    if cluster is not None:
        cluster.close()


def _time_call(loops: int) -> float:
    t0 = time.perf_counter()
    burn(1, loops)
    return time.perf_counter() - t0


def per_task_overhead(in_flight: int, n: int = 300) -> float:
    """Seconds per trivial task through the engine, one item per task."""
    import nanostream as ns
    from nanostream.dask import DaskEngine

    engine = DaskEngine(client(), task_seconds=0)
    times = []
    for _ in range(3):
        out: list = []
        with Stopwatch() as sw:
            (
                ns.from_iterable(range(n))
                | ns.transform(abs, workers=in_flight)
                | ns.sink(out.append)
            ).run(engine=engine)
        assert out == list(range(n))
        times.append(sw.seconds / n)
    return statistics.median(times)


def setup(p: dict[str, Any]) -> str:
    probe = 20_000
    best = min(_time_call(probe) for _ in range(5))
    loops = max(1, int(probe * p["item_ms"] / 1000 / best))
    one = min(_time_call(loops) for _ in range(3))
    p["loops"] = loops
    p["expected"] = [burn(x, loops) for x in range(p["n"])]  # correctness reference
    c = client()
    c.wait_for_workers(CLUSTER_WORKERS)
    # Dask by hand gets the chunk the engine aims at (task_seconds / item time)
    p["chunk"] = max(1, int(0.2 / max(one, 1e-9)))
    note = f"{one * 1000:.2f} ms per item"
    if p.get("overhead"):
        rt, tp = per_task_overhead(1), per_task_overhead(8)
        p["overhead_ms"] = {"round_trip": rt * 1000, "pipelined": tp * 1000}
        note += f"; per task: {rt * 1000:.1f} ms round trip, {tp * 1000:.1f} ms with 8 in flight"
    return note


def _check(p: dict[str, Any], out: list) -> None:
    exp = p["expected"]
    assert len(out) == len(exp), f"got {len(out)} results, expected {len(exp)}"
    assert out == exp, "wrong results or order"


def run_serial(p: dict[str, Any]) -> float:
    work = make_work(p["loops"])
    with Stopwatch() as sw:
        out = [work(x) for x in range(p["n"])]
    _check(p, out)
    return sw.seconds


def _nanostream(
    workers: int, engine: str | None = None, task_seconds: float = 0.2, executor: str = "thread"
):
    def run(p: dict[str, Any]) -> float:
        import nanostream as ns

        work = make_work(p["loops"])
        out: list = []
        with Stopwatch() as sw:
            eng = None
            if engine == "dask":
                from nanostream.dask import DaskEngine

                eng = DaskEngine(client(), task_seconds=task_seconds)
            (
                ns.from_iterable(range(p["n"]))
                | ns.transform(work, workers=workers, executor=executor)
                | ns.sink(out.append)
            ).run(engine=eng)
        _check(p, out)
        return sw.seconds

    return run


def run_batched(p: dict[str, Any]) -> float:
    """Items batched into lists before the stage: tasks beyond the largest chunk."""
    import nanostream as ns
    from nanostream.dask import DaskEngine

    loops = p["loops"]

    def work_batch(xs):
        return [burn(x, loops) for x in xs]

    out: list = []
    with Stopwatch() as sw:
        (
            ns.from_iterable(range(p["n"]))
            | ns.batch(p["chunk"])
            | ns.transform(work_batch, workers=4)
            | ns.flatten()
            | ns.sink(out.append)
        ).run(engine=DaskEngine(client()))
    _check(p, out)
    return sw.seconds


def run_dask_by_hand(p: dict[str, Any]) -> float:
    import functools

    c = client()
    size = p["chunk"]
    fn = functools.partial(burn_chunk, loops=p["loops"])
    with Stopwatch() as sw:
        items = list(range(p["n"]))
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        futures = c.map(fn, chunks, pure=False)
        out = [y for ys in c.gather(futures) for y in ys]
        del futures
    _check(p, out)
    return sw.seconds


def _speedup(value: float, ratio: float | None) -> bool:
    return ratio is not None and ratio >= 1.6


def _contenders(one_per_task: bool = False, batched: bool = False) -> list[Contender]:
    dask = ("nanostream", "distributed")
    rows = [
        Contender(
            "nanostream DaskEngine",
            _nanostream(4, "dask"),
            SUBJECT,
            requires=dask,
            note="workers=4",
        ),
        Contender("serial loop", run_serial, LIMIT),
        Contender(
            "nanostream DaskEngine",
            _nanostream(2, "dask"),
            REFERENCE,
            requires=dask,
            note="workers=2",
        ),
        Contender(
            "Dask by hand: client.map over chunks",
            run_dask_by_hand,
            PEER,
            requires=("distributed",),
            note="{chunk} items/task",
        ),
        Contender(
            "nanostream executor='process'",
            _nanostream(2, executor="process"),
            REFERENCE,
            requires=("nanostream",),
            note="workers=2",
        ),
        Contender(
            "nanostream threads",
            _nanostream(2),
            REFERENCE,
            requires=("nanostream",),
            note="workers=2",
        ),
    ]
    if batched:
        rows.insert(
            1,
            Contender(
                "nanostream DaskEngine after ns.batch",
                run_batched,
                REFERENCE,
                requires=dask,
                note="{chunk} items/batch, workers=4",
            ),
        )
    if one_per_task:
        rows.append(
            Contender(
                "nanostream DaskEngine, 1 item/task",
                _nanostream(4, "dask", task_seconds=0),
                REFERENCE,
                requires=dask,
                note="workers=4",
            )
        )
    return rows


register(
    Workload(
        id="W8",
        title="{n} x CPU-bound {item_ms} ms on a 2-worker Dask LocalCluster",
        unit="s",
        params=lambda quick: {"n": 100 if quick else 800, "item_ms": 5, "overhead": True},
        setup=setup,
        contenders=_contenders(one_per_task=True),
        target=Target(">= 1.6x serial", _speedup),
        ratio=lambda value, base: base / value,
    )
)

register(
    Workload(
        id="W8s",
        title="{n} x CPU-bound {item_ms} ms (small items) on a 2-worker Dask LocalCluster",
        unit="s",
        params=lambda quick: {"n": 4000 if quick else 40_000, "item_ms": 0.1},
        setup=setup,
        contenders=_contenders(batched=True),
        ratio=lambda value, base: base / value,
    )
)
